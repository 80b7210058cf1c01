"""The connection manager: connect, handshake, register, verify the cache, reconnect.

One daemon thread per ClientStorage.  While disconnected it tries the addresses (in order)
with a capped exponential backoff; once a connection is ready it sleeps until the connection
is lost, sending a heartbeat every :data:`HEARTBEAT_INTERVAL` seconds.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import TYPE_CHECKING, Any

import ZODB.event
from ZODB.POSException import ReadOnlyError

from ZEO.Exceptions import ClientDisconnected
from ZEO.interfaces import StaleCache

from .connection import Connection
from .tls import TLSError

if TYPE_CHECKING:
    from .storage import ClientStorage

logger = logging.getLogger("ZEO.ClientStorage")

HEARTBEAT_INTERVAL = 60.0
FIRST_RETRY = 0.05
MAX_RETRY = 2.0
CONNECT_TIMEOUT = 10.0


class RegistrationFailed(Exception):
    """The server refused us or the cache cannot be used with it; retry later."""


def normalize_addresses(addr: Any) -> list:
    """``addr`` as a list of ``(host, port)`` tuples and Unix socket paths (zeo-facts §3.1)."""
    if isinstance(addr, list):
        items = addr
    else:
        items = [addr]
    out: list = []
    for a in items:
        if isinstance(a, int):
            out.append(("127.0.0.1", a))
        elif isinstance(a, str):
            out.append(a)
        elif isinstance(a, tuple) and len(a) == 2:
            host, port = a
            out.append((host or "127.0.0.1", int(port)))
        else:
            raise ValueError(f"bad ZEO address {a!r}")
    if not out:
        raise ValueError("no ZEO address given")
    return out


class ConnectionManager:
    """Keeps ``storage`` connected; see the module docstring."""

    def __init__(self, storage: ClientStorage, addresses: list, *, ssl: Any = None,
                 ssl_server_hostname: str | None = None) -> None:
        self.storage = storage
        self.addresses = addresses
        self.ssl = ssl
        self.ssl_server_hostname = ssl_server_hostname
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"{storage.__name__} zeo client networking thread",
            daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Something changed (lost connection, new addresses): look at the state again."""
        with self._wake:
            self._wake.notify_all()

    def new_addr(self, addr: Any) -> None:
        self.addresses = normalize_addresses(addr)
        self.wake()

    # -- the thread ------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        with self._wake:
            if not self._closed:
                self._wake.wait(seconds)

    def _run(self) -> None:
        delay = FIRST_RETRY
        while not self._closed:
            conn = self.storage._conn
            if conn is not None:
                with self._wake:
                    if self._closed or self.storage._conn is not conn:
                        continue
                    notified = self._wake.wait(HEARTBEAT_INTERVAL)
                if not notified and self.storage._conn is conn:
                    conn.heartbeat()
                continue
            if self._try_addresses():
                delay = FIRST_RETRY
                continue
            if self.storage._connect_error is not None:
                # A TLS failure: retry slowly, so that a constructor waiting for us sees the
                # error and closes us while we sleep, not while we block in a new attempt.
                delay = MAX_RETRY
            self._sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, MAX_RETRY)

    def _try_addresses(self) -> bool:
        tls_error: TLSError | None = None
        for addr in list(self.addresses):
            if self._closed:
                return False
            try:
                conn = Connection.open(
                    addr, self.storage, timeout=CONNECT_TIMEOUT, name=self.storage.__name__,
                    ssl_context=self.ssl, server_hostname=self.ssl_server_hostname)
            except TLSError as e:  # a configuration problem: tell a waiting constructor
                logger.error("%s", e)
                tls_error = e
                continue
            except Exception as e:
                logger.debug("cannot connect to %r: %s", addr, e)
                continue
            try:
                self._setup(conn)
            except Exception as e:
                if isinstance(e, RegistrationFailed):
                    logger.error("registration with %r failed: %s", addr, e)
                elif not isinstance(e, ClientDisconnected):
                    logger.exception("registration or cache validation failed with %r", addr)
                conn.close()
                self.storage._abandon_setup(conn)
                continue
            if self._closed:
                conn.close()
                return False
            self.storage._connect_error = None
            return True
        if tls_error is not None:  # every address failed, one of them on TLS
            self.storage._connect_error = tls_error
        return False

    def _setup(self, conn: Connection) -> None:
        """Register, verify the cache, get_info, label; then hand ``conn`` to the storage."""
        storage = self.storage
        storage._begin_setup(conn)
        read_only = storage._read_only
        try:
            server_tid = conn.call_sync("register", storage._storage_id, read_only)
        except ReadOnlyError:
            if not storage._read_only_fallback or read_only:
                raise RegistrationFailed("the server is read-only") from None
            read_only = True
            server_tid = conn.call_sync("register", storage._storage_id, True)
        if server_tid is None:
            server_tid = conn.call_sync("lastTransaction")
        server_tid = self._verify_cache(conn, server_tid)
        info = conn.call_sync("get_info")
        if storage._client_label:
            conn.call_oneway("set_client_label", storage._client_label)
        storage._finish_setup(conn, server_tid, info, bool(read_only))

    def _verify_cache(self, conn: Connection, server_tid: bytes) -> bytes:
        """zeo-facts §3.3; returns the tid the cache is now current to."""
        storage = self.storage
        cache = storage._cache
        db = storage._db
        if len(cache):
            cache_tid = cache.getLastTid()
            if not cache_tid:
                cache.clear()
                if db is not None:
                    db.invalidateCache()
            elif cache_tid > server_tid:
                logger.critical(
                    "Client cache is out of sync with the server. Verify that this is expected "
                    "and then remove the cache file (usually a .zec file) before restarting "
                    "the server.")
                raise RegistrationFailed("client cache is newer than the server")
            elif cache_tid < server_tid:
                r = conn.call_sync("getInvalidations", cache_tid)
                if r is None:
                    ZODB.event.notify(StaleCache(storage))
                    logger.critical("%s dropping stale cache", storage.__name__)
                    cache.clear()
                    if db is not None:
                        db.invalidateCache()
                else:
                    tid, oids = r
                    for oid in oids:
                        cache.invalidate(oid, None)
                    if db is not None:
                        db.invalidate(tid, oids)
                    server_tid = tid
        cache.setLastTid(server_tid)
        return server_tid
