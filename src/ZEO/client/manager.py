"""The connection manager: connect, handshake, register, verify the cache, reconnect.

One daemon thread per ClientStorage.  While disconnected it tries all the addresses in
parallel, retrying at once and then with a capped exponential backoff with jitter; a failure
is logged once per address and cause.  Once a connection is ready it sleeps until the
connection is lost, sending a heartbeat every :data:`HEARTBEAT_INTERVAL` seconds; a read-only
fallback connection instead looks for a writable server now and then and upgrades to it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
from typing import Any, Protocol

from ZODB.POSException import ReadOnlyError

from ZEO import address
from ZEO.Exceptions import ClientDisconnected

from .connection import Connection, Handler
from .tls import TLSError

logger = logging.getLogger("ZEO.ClientStorage")

HEARTBEAT_INTERVAL = 60.0
FIRST_RETRY = 0.05
MAX_RETRY = 1.0
CONNECT_TIMEOUT = 10.0
UPGRADE_FIRST = 0.5  # read-only fallback: first look for a writable server
UPGRADE_MAX = 10.0


class RegistrationFailed(Exception):
    """The server refused us or the cache cannot be used with it; retry later."""


@dataclasses.dataclass(frozen=True)
class Registration:
    """How the manager registers its storage: fixed for the storage's life."""

    storage_id: str
    read_only: bool
    read_only_fallback: bool
    client_label: str | None
    #: How long callers wait for a connection: a silent server gets no longer than this.
    wait_timeout: float
    #: "fastest" (every address at once, the first to answer wins: ZEO's way) or "random"
    #: (one at a time in a random order: clients spread over a fleet's servers).
    address_policy: str = "fastest"


class ManagedStorage(Handler, Protocol):
    """The hand-over a storage offers its manager (``ClientStorage`` implements it).

    A connection goes ``begin_setup`` -> ``verify_cache`` -> ``finish_setup`` (it is then
    the storage's live connection) or ``abandon_setup``; the storage reports its loss through
    :meth:`~ZEO.client.connection.Handler.connection_lost` and :meth:`ConnectionManager.wake`.
    """

    __name__: str

    def isReadOnly(self) -> bool: ...

    def live_connection(self) -> Connection | None:
        """The connection in use, or None."""

    def begin_setup(self, conn: Connection) -> None:
        """``conn`` is registering: queue the invalidations it brings meanwhile."""

    def abandon_setup(self, conn: Connection) -> None:
        """``conn`` will not be used: forget what was queued for it."""

    def verify_cache(self, conn: Connection, server_tid: bytes) -> bytes:
        """Bring the cache up to ``server_tid`` (zeo-facts §3.3); the tid it is now at.
        Raises :class:`RegistrationFailed` when the cache cannot be used with this server."""

    def finish_setup(self, conn: Connection, server_tid: bytes, info: dict,
                     read_only: bool) -> None:
        """Make ``conn`` the live connection; ``info`` is the server's ``get_info``."""


class ConnectionManager:
    """Keeps ``storage`` connected; see the module docstring."""

    def __init__(self, storage: ManagedStorage, addresses: list, registration: Registration,
                 *, ssl: Any = None, ssl_server_hostname: str | None = None) -> None:
        self.storage = storage
        self.addresses = addresses
        self.registration = registration
        #: A TLS failure on the last round of attempts (a configuration problem: a caller
        #: waiting for a connection stops waiting), or None.
        self.connect_error: BaseException | None = None
        self.ssl = ssl
        self.ssl_server_hostname = ssl_server_hostname
        self._wake = threading.Condition()
        self._closed = False
        #: The last failure per address (for error messages); cleared on success.
        self.last_errors: dict[Any, str] = {}
        self._logged: dict[Any, str] = {}
        self._announced: set = set()  # addresses whose first attempt was logged
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
        self.addresses = address.normalize(addr)
        self.wake()

    # -- the thread ------------------------------------------------------------------------

    def _sleep(self, seconds: float) -> None:
        with self._wake:
            if not self._closed:
                self._wake.wait(seconds)

    def _run(self) -> None:
        delay = FIRST_RETRY
        upgrade_delay = UPGRADE_FIRST
        while not self._closed:
            storage = self.storage
            conn = storage.live_connection()
            if conn is not None:
                reg = self.registration
                upgrading = (storage.isReadOnly() and reg.read_only_fallback
                             and not reg.read_only)
                wait = upgrade_delay * (1 + random.random() / 2) if upgrading else (
                    HEARTBEAT_INTERVAL)
                with self._wake:
                    if self._closed or storage.live_connection() is not conn:
                        continue
                    notified = self._wake.wait(wait)
                if notified or storage.live_connection() is not conn:
                    continue
                if upgrading:  # a read-only fallback connection: look for a writable one
                    if not self._try_addresses(upgrade_from=conn):
                        upgrade_delay = min(upgrade_delay * 2, UPGRADE_MAX)
                    continue
                conn.heartbeat()
                continue
            upgrade_delay = UPGRADE_FIRST
            if self._try_addresses():
                delay = FIRST_RETRY
                continue
            if self.connect_error is not None:
                # A TLS failure: retry slowly, so that a constructor waiting for us sees the
                # error and closes us while we sleep, not while we block in a new attempt.
                delay = MAX_RETRY
            self._sleep(delay * (1 + random.random() / 2))
            delay = min(delay * 2, MAX_RETRY)

    def _open_all(self, addresses: list) -> tuple[queue.Queue, int]:
        """Start one connection attempt per address, all in parallel (zeo-facts §3.1).

        Each result arrives on the returned queue as ``(addr, connection or None, error)``.
        """
        results: queue.Queue = queue.Queue()

        # A server that says nothing is given no longer than the caller waits for one.
        wait = self.registration.wait_timeout or CONNECT_TIMEOUT
        timeout = min(CONNECT_TIMEOUT, max(1.0, wait))
        for addr in addresses:
            if addr not in self._announced:
                self._announced.add(addr)
                logger.info("connecting to %r", addr)

        def attempt(addr: Any) -> None:
            try:
                conn = Connection.open(
                    addr, self.storage, timeout=timeout, name=self.storage.__name__,
                    ssl_context=self.ssl, server_hostname=self.ssl_server_hostname)
            except BaseException as e:
                results.put((addr, None, e))
            else:
                results.put((addr, conn, None))

        if len(addresses) == 1:  # the common case: no thread
            attempt(addresses[0])
        else:
            for addr in addresses:
                threading.Thread(target=attempt, args=(addr,), daemon=True,
                                 name=f"{self.storage.__name__} connect {addr!r}").start()
        return results, len(addresses)

    @staticmethod
    def _drain(results: queue.Queue, remaining: int) -> None:
        """Close the connections of attempts that finish after another one won."""
        for _ in range(remaining):
            _addr, conn, _err = results.get()
            if conn is not None:
                conn.close()

    def _note_failure(self, addr: Any, err: BaseException, what: str) -> None:
        """Log a failure once per address and cause; repeats go to DEBUG (no log flood)."""
        text = f"{what} {addr!r} failed: {type(err).__name__}: {err}"
        self.last_errors[addr] = text
        if self._logged.get(addr) == text:
            logger.debug("%s (again)", text)
            return
        self._logged[addr] = text
        if isinstance(err, (RegistrationFailed, TLSError, OSError, ClientDisconnected,
                            ReadOnlyError)):
            logger.log(logging.ERROR if isinstance(err, (RegistrationFailed, TLSError))
                       else logging.INFO, "%s", text)
        else:
            logger.error("%s", text, exc_info=err)

    def failure_summary(self) -> str:
        """Why the addresses could not be used, the last reason per address."""
        return "; ".join(self.last_errors.get(a, f"{a!r}: no attempt finished yet")
                         for a in self.addresses)

    def _try_addresses(self, upgrade_from: Connection | None = None) -> bool:
        """Connect, register and verify on the first usable address.

        Writable registrations win; with ``read_only_fallback`` a read-only one is taken only
        when no address accepted a writable one.  With ``upgrade_from`` (a read-only fallback
        connection) only a writable registration is taken, and it replaces that connection.
        The ``fastest`` policy tries every address at once (ZEO's way); ``random`` tries them
        one at a time in a random order, so the clients of a fleet spread over its servers.
        """
        addresses = list(self.addresses)
        if self.registration.address_policy != "random" or len(addresses) < 2:
            return self._try_some(addresses, upgrade_from, True)
        for addr in random.sample(addresses, len(addresses)):
            if self._closed:
                return False
            if self._try_some([addr], upgrade_from, False):
                return True
        # No writable registration anywhere: a read-only one, if allowed, from any of them.
        return (self.registration.read_only_fallback and upgrade_from is None
                and self._try_some(addresses, None, True))

    def _try_some(self, addresses: list, upgrade_from: Connection | None,
                  allow_fallback: bool) -> bool:
        storage = self.storage
        results, pending = self._open_all(addresses)
        tls_error: TLSError | None = None
        fallback: tuple[Any, Connection] | None = None
        fallback_ok = (self.registration.read_only_fallback and upgrade_from is None
                       and allow_fallback)
        err: BaseException | None = None
        try:
            while pending:
                addr, conn, err = results.get()
                pending -= 1
                if conn is None:
                    if isinstance(err, TLSError):  # a configuration problem: tell the waiter
                        tls_error = err
                    self._note_failure(addr, err, "connecting to")
                    continue
                if self._closed:
                    conn.close()
                    continue
                try:
                    self._setup(conn, self.registration.read_only, upgrade_from)
                except ReadOnlyError as e:
                    storage.abandon_setup(conn)
                    if fallback_ok and fallback is None:
                        fallback = (addr, conn)  # used if no address lets us write
                    else:
                        conn.close()
                        if upgrade_from is None:
                            self._note_failure(addr, RegistrationFailed("the server is read-only"),
                                               "registration with")
                        else:
                            logger.debug("no upgrade: %r is read-only (%s)", addr, e)
                    continue
                except Exception as e:
                    conn.close()
                    storage.abandon_setup(conn)
                    self._note_failure(addr, e, "registration or cache validation with")
                    continue
                return self._won(conn, results, pending, fallback)
            if fallback is not None and not self._closed:
                addr, conn = fallback
                try:
                    self._setup(conn, True, None)
                except Exception as e:
                    conn.close()
                    storage.abandon_setup(conn)
                    self._note_failure(addr, e, "read-only registration with")
                else:
                    return self._won(conn, results, 0, None)
            if tls_error is not None and upgrade_from is None:
                self.connect_error = tls_error  # every address failed, one of them on TLS
            return False
        finally:
            # A traceback may hold this frame: its locals must not hold the errors too.
            err = tls_error = None

    def _won(self, conn: Connection, results: queue.Queue, pending: int,
             fallback: tuple[Any, Connection] | None) -> bool:
        if fallback is not None:
            fallback[1].close()
        if pending:
            threading.Thread(target=self._drain, args=(results, pending), daemon=True).start()
        if self._closed:
            conn.close()
            return False
        self.connect_error = None
        self._logged.clear()
        self.last_errors.clear()
        return True

    def _setup(self, conn: Connection, read_only: bool,
               replacing: Connection | None = None) -> None:
        """Register, verify the cache, get_info, label; then hand ``conn`` to the storage.

        Raises ``ReadOnlyError`` when a writable registration was refused.  ``replacing`` (an
        upgrade) is closed once ``conn`` is registered, before the cache is verified again.
        """
        storage = self.storage
        reg = self.registration
        storage.begin_setup(conn)
        server_tid = conn.call_sync("register", reg.storage_id, read_only)
        if replacing is not None:
            # Like a disconnect: a transaction on the old connection fails, then we verify.
            logger.info("%s upgrading to a writable connection to %r", storage.__name__,
                        conn.peer)
            replacing.close()
            replacing.join(10)
        if server_tid is None:
            server_tid = conn.call_sync("lastTransaction")
        server_tid = storage.verify_cache(conn, server_tid)
        info = conn.call_sync("get_info")
        if reg.client_label:
            conn.call_oneway("set_client_label", reg.client_label)
        storage.finish_setup(conn, server_tid, info, bool(read_only))
