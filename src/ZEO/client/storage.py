"""``ClientStorage``: a ZODB storage served by a ZEO server.

Threads (docs/design.rst): API callers write their frames themselves and wait; the
connection's reader thread does all cache work in the server's order (load results,
invalidations, ``tpc_finish``); the :class:`~ZEO.client.manager.ConnectionManager` thread
connects, registers, verifies the cache and reconnects.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import ZODB.BaseStorage
import ZODB.event
import ZODB.interfaces
import zope.interface
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.POSException import (
    ConflictError,
    POSKeyError,
    ReadOnlyError,
    StorageTransactionError,
)
from ZODB.utils import z64

from ZEO import address
from ZEO.Exceptions import ClientDisconnected
from ZEO.interfaces import StaleCache

from .blob import BlobStore, open_blob_store
from .cache import ClientCache
from .connection import Connection
from .manager import ConnectionManager, Registration, RegistrationFailed
from .prefetch import MAXTID, Prefetcher

logger = logging.getLogger("ZEO.ClientStorage")

MB = 1024 * 1024
MAX_VOTE_ATTEMPTS = 9

# Interfaces a server may announce in get_info that we then provide too (zeo-facts §3.2).
_REMOTE_INTERFACES = {
    ("ZODB.interfaces", name): getattr(ZODB.interfaces, name)
    for name in (
        "IStorageRestoreable",
        "IStorageIteration",
        "IStorageUndoable",
        "IStorageCurrentRecordIteration",
        "IExternalGC",
    )
}


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value or "").encode("utf-8")


@zope.interface.implementer(
    ZODB.interfaces.IMultiCommitStorage,
    ZODB.interfaces.IPrefetchStorage,
    ZODB.interfaces.IStorage,
)
class ClientStorage(ConflictResolvingStorage):
    """A ZODB storage whose data lives on a ZEO server; ZEO 5/6's constructor signature.

    :param addr: ``(host, port)``, a port number (on 127.0.0.1), a Unix socket path, or a
        list of those (servers holding the same data: the first that answers is used).
    :param storage: the storage id on the server (``"1"``).
    :param cache_size: bytes of the object cache (20 MB).
    :param name: the storage's name (default: the address).
    :param wait_timeout: seconds to wait for a server when the storage is used while
        disconnected (30); also the longest a silent server is given to greet us.
    :param read_only: open read-only.
    :param read_only_fallback: open read-write, or read-only when only a read-only server
        (or certificate) answers.
    :param blob_dir: the local blob cache directory (or the directory shared with the
        server, with ``shared_blob_dir``).
    :param shared_blob_dir: ``blob_dir`` is the server's own blob directory.
    :param blob_cache_size: target size in bytes of the blob cache (no limit by default).
    :param blob_cache_size_check: how often the blob cache is cleaned, in percent of
        ``blob_cache_size`` downloaded (10).
    :param client_label: this client's name in the server's log lines and admin socket.
    :param cache: a persistent cache file's path.
    :param client: a persistent cache's name, with ``var`` its directory.
    :param var: see ``client``.
    :param ssl: an ``ssl.SSLContext`` to connect with TLS.
    :param ssl_server_hostname: the host name to check the server's certificate against.
    :param wait: wait for a connection in the constructor (true).
    :param server_sync: make ``sync()`` a round trip to the server (false).
    :param prefetch_references: *zeo-ng*: uncached objects a cold load's record refers to
        that are fetched along with it (32; 0: off).
    :param read_ahead: *zeo-ng*: the largest window of sequential read-ahead (64; 0: off).
    :param address_policy: *zeo-ng*: with several addresses, ``"fastest"`` (ZEO's way: all
        tried at once, the first to answer is used) or ``"random"`` (tried one at a time in a
        random order, so the clients of a fleet of servers spread over them).

    ``disconnect_poll``, ``min_disconnect_poll``, ``max_disconnect_poll``,
    ``drop_cache_rather_verify``, ``credentials``, ``username``, ``password`` and ``realm``
    are accepted and ignored, as by ZEO 5/6.  :doc:`client` says more about each option.
    """

    def __init__(
        self,
        addr: Any,
        storage: str = "1",
        cache_size: int = 20 * MB,
        name: str = "",
        wait_timeout: float | None = None,
        disconnect_poll: Any = None,
        read_only: Any = 0,
        read_only_fallback: Any = 0,
        blob_dir: str | None = None,
        shared_blob_dir: bool = False,
        blob_cache_size: int | None = None,
        blob_cache_size_check: int = 10,
        client_label: str | None = None,
        cache: Any = None,
        ssl: Any = None,
        ssl_server_hostname: str | None = None,
        client: str | None = None,
        var: str | None = None,
        min_disconnect_poll: Any = 1,
        max_disconnect_poll: Any = None,
        wait: bool = True,
        drop_cache_rather_verify: bool = True,
        credentials: Any = None,
        server_sync: bool = False,
        username: Any = None,
        password: Any = None,
        realm: Any = None,
        _client_factory: Any = None,
        prefetch_references: int = 32,
        read_ahead: int = 64,
        address_policy: str = "fastest",
    ) -> None:
        if address_policy not in ("fastest", "random"):
            raise ValueError(f"address_policy is 'fastest' or 'random', not {address_policy!r}")
        self._addr = addr
        addresses = address.normalize(addr)
        self.__name__ = name or str(addr)
        self._storage_id = storage
        self._read_only = bool(read_only)
        self._read_only_fallback = bool(read_only_fallback)
        self._is_read_only = bool(read_only)
        self._wait_timeout = 30.0 if wait_timeout is None else float(wait_timeout)
        self._server_sync = bool(server_sync)
        self.blob_dir = blob_dir
        self.shared_blob_dir = shared_blob_dir
        self._tmp_dir: str | None = None
        self._blobs: BlobStore | None = open_blob_store(
            blob_dir, shared_blob_dir, blob_cache_size, blob_cache_size_check)

        if isinstance(cache, ClientCache) or (
            cache is not None and not isinstance(cache, (str, os.PathLike))
        ):
            self._cache = cache
        else:
            path = os.fspath(cache) if cache is not None else None
            if path is None and client is not None:
                path = os.path.join(var or os.getcwd(), f"{client}-{storage}.zec")
            self._cache = ClientCache(path, size=cache_size)

        self._info: dict = {
            "length": 0, "size": 0, "name": "ZEO Client", "supportsUndo": 0, "interfaces": (),
        }
        # Cold loads, and what they fetch ahead (ZEO.client.prefetch).
        self._prefetcher = Prefetcher(self._cache, lambda: self._conn, prefetch_references,
                                      read_ahead)
        self._db: Any = None
        self._conn: Connection | None = None
        self._setup_conn: Connection | None = None
        self._server_addr: Any = None
        self.protocol_version: bytes | None = None
        self._connected_once = False
        self._closed = False
        self._ready = threading.Event()
        self._generation = 0
        # Guards the hand-over from "setting up" to "ready" against invalidations arriving.
        self._state_lock = threading.Lock()
        self._queued_invalidations: list[tuple[bytes, Any]] = []

        self._tpc_lock = threading.Lock()
        # Held while tpc_finish moves the last tid and runs ZODB's callback (reentrant: the
        # callback may ask for lastTransaction()).
        self._last_tid_lock = threading.RLock()
        self._txn: Any = None
        self._txn_conn: Connection | None = None
        self._txn_generation = -1
        self._txn_buffer: dict[bytes, bytes | None] = {}
        self._txn_resolved: set[bytes] = set()

        self._oid_lock = threading.Lock()
        self._oids: list[bytes] = []
        self._iterator_garbage: list[int] = []

        self._manager = ConnectionManager(
            self, addresses,
            Registration(storage, self._read_only, self._read_only_fallback, client_label,
                         self._wait_timeout, address_policy),
            ssl=ssl, ssl_server_hostname=ssl_server_hostname)
        self._manager.start()
        if wait:
            deadline = time.monotonic() + self._wait_timeout
            # A TLS failure (ZEO.client.tls.TLSError) ends the wait early: it needs fixing.
            while not self._ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
                if self._manager.connect_error is not None or time.monotonic() >= deadline:
                    break
            if not self._connected_once:  # (ready may be cleared again by a quick drop)
                err = self._manager.connect_error
                self.close()
                if err is not None:
                    self._manager.connect_error = None
                    try:
                        raise err
                    finally:
                        del err  # its traceback holds this frame: no cycle
                raise ClientDisconnected(
                    f"timed out waiting for connection: {self._manager.failure_summary()}")

    # -- connection state (manager thread and reader threads) ------------------------------

    # The hand-over to the connection manager (ZEO.client.manager.ManagedStorage).

    def live_connection(self) -> Connection | None:
        """The connection in use, or None (the manager's view; callers use _connection)."""
        return self._conn

    def begin_setup(self, conn: Connection) -> None:
        with self._state_lock:
            self._setup_conn = conn
            self._queued_invalidations = []

    def abandon_setup(self, conn: Connection) -> None:
        with self._state_lock:
            if self._setup_conn is conn:
                self._setup_conn = None
                self._queued_invalidations = []

    def finish_setup(self, conn: Connection, server_tid: bytes, info: dict,
                     read_only: bool) -> None:
        self._info.update(info)
        provided = [
            _REMOTE_INTERFACES[tuple(i)] for i in info.get("interfaces", ())
            if tuple(i) in _REMOTE_INTERFACES
        ]
        if self._blobs is not None and any(
                tuple(i) == ("ZODB.interfaces", "IBlobStorage")
                for i in info.get("interfaces", ())):
            provided.append(ZODB.interfaces.IBlobStorage)
        if provided:
            zope.interface.alsoProvides(self, *provided)
        self._is_read_only = read_only
        self._server_addr = conn.peer
        self.protocol_version = conn.protocol_version
        if self._db is not None and self._connected_once:
            self._db.invalidateCache()
        with self._state_lock:
            for tid, oids in self._queued_invalidations:
                if tid > server_tid:
                    self._apply_invalidations(tid, oids)
            self._queued_invalidations = []
            self._setup_conn = None
            if conn.closed:
                raise ClientDisconnected("connection lost during setup")
            self._conn = conn
            self._connected_once = True
            self._ready.set()
        logger.info("%s connected to %r (%s)", self.__name__, conn.peer,
                    "read-only" if read_only else "read-write")

    def verify_cache(self, conn: Connection, server_tid: bytes) -> bytes:
        """zeo-facts §3.3 (manager thread); the tid the cache is now current to."""
        cache = self._cache
        db = self._db
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
                    ZODB.event.notify(StaleCache(self))
                    logger.critical("%s dropping stale cache", self.__name__)
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

    def connection_lost(self, conn: Connection) -> None:
        """Reader thread: ``conn`` ended.  Poison the transaction and reconnect."""
        with self._state_lock:
            if self._conn is not conn:
                return
            self._conn = None
            self._ready.clear()
            self._generation += 1
        if not self._closed:
            logger.warning("%s disconnected from %r", self.__name__, conn.peer)
            self._manager.wake()

    def server_call(self, conn: Connection, name: str, args: tuple) -> None:
        """Reader thread: a one-way call from the server."""
        if name == "invalidateTransaction":
            tid, oids = args
            with self._state_lock:
                if conn is self._setup_conn:
                    self._queued_invalidations.append((tid, oids))
                elif conn is self._conn:
                    self._apply_invalidations(tid, oids)
        elif name == "info":
            (info,) = args
            self._info.update(info)
        elif name.startswith("receiveBlob") and self._blobs is not None:
            self._blobs.server_call(name, args)  # streamed download, in the server's order
        else:
            raise AttributeError(f"unknown server call {name!r}")

    def _apply_invalidations(self, tid: bytes, oids: Any) -> None:
        cache = self._cache
        for oid in oids:
            cache.invalidate(oid, tid)
        db = self._db
        if db is not None:
            db.invalidate(tid, oids)
        cache.setLastTid(tid)

    def _connection(self) -> Connection:
        """The live connection; while reconnecting, wait for one up to ``wait_timeout``."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise ClientDisconnected("the storage is closed")
        if not self._connected_once:
            raise ClientDisconnected("never connected")
        deadline = time.monotonic() + self._wait_timeout
        while True:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                raise ClientDisconnected("timed out waiting for connection")
            if conn is not None:
                # Closed, but its reader has not reported the loss yet: a moment more.
                time.sleep(min(0.005, remaining))
            else:
                self._ready.wait(remaining)

    def _call(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        try:
            return self._connection().call_sync(name, *args, timeout=timeout)
        except ConflictError as e:
            if e.oid:
                self._cache.invalidate(e.oid, None)
            raise

    # -- general ----------------------------------------------------------------------------

    def is_connected(self, test: bool = False) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed

    def new_addr(self, addr: Any) -> None:
        """Use ``addr`` at the next (re)connection."""
        self._addr = addr
        self._manager.new_addr(addr)

    def registerDB(self, db: Any) -> None:
        ConflictResolvingStorage.registerDB(self, db)
        self._db = db

    def getName(self) -> str:
        state = "connected" if self._conn is not None else "disconnected"
        return f"{self.__name__} ({state})"

    def sortKey(self) -> str:
        if self._conn is None or self._server_addr is None:
            raise ClientDisconnected("sortKey of a disconnected storage")
        return f"{self._storage_id}:{self._server_addr}"

    def getSize(self) -> int:
        return self._info["size"]

    def __len__(self) -> int:
        return self._info["length"]

    def isReadOnly(self) -> bool:
        return self._is_read_only

    def supportsUndo(self) -> bool:
        return bool(self._info["supportsUndo"])

    def lastTransaction(self) -> bytes:
        with self._last_tid_lock:  # not while a commit's callback is still running
            return self._cache.getLastTid() or z64

    def temporaryDirectory(self) -> str:
        if self.blob_dir:
            path = os.path.join(self.blob_dir, "tmp")
            os.makedirs(path, exist_ok=True)
            return path
        if self._tmp_dir is None:
            self._tmp_dir = tempfile.mkdtemp(prefix="zeo-client-")
        return self._tmp_dir

    def server_status(self, timeout: float | None = None) -> dict:
        return self._call("server_status", timeout=timeout)

    def ping(self, timeout: float | None = None) -> None:
        self._call("ping", timeout=timeout)

    def sync(self) -> None:
        if self._server_sync:
            self.ping()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._manager.close()
        conn = self._conn or self._setup_conn
        self._conn = None
        self._ready.clear()
        if conn is not None:
            conn.close()
            conn.join(5)
        self._cache.close()
        if self._blobs is not None:
            self._blobs.close()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def statistics(self) -> dict:
        stats: dict[str, Any] = {"connected": self.is_connected(),
                                 "generation": self._generation}
        conn = self._conn
        if conn is not None:
            stats["connection"] = conn.statistics()
        stats.update(self._prefetcher.statistics())
        try:
            stats["cache"] = self._cache.statistics()
        except AttributeError:
            pass
        return stats

    # -- reads ------------------------------------------------------------------------------

    def loadBefore(self, oid: bytes, tid: bytes):
        self._prefetcher.loading(oid)
        r = self._cache.loadBefore(oid, tid)
        if r is not None:
            return r
        return self._prefetcher.fetch(self._connection(), oid, tid)

    def load(self, oid: bytes, version: str = ""):
        self._prefetcher.loading(oid)
        r = self._cache.load(oid)
        if r is not None:
            return r
        r = self._prefetcher.fetch(self._connection(), oid, MAXTID)
        if r is None:
            raise POSKeyError(oid)
        return r[0], r[1]

    def prefetch(self, oids, tid: bytes) -> None:
        """Send a ``loadBefore`` for each uncached oid without waiting for the replies."""
        self._prefetcher.prefetch(self._connection(), oids, tid)

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        return self._call("loadSerial", oid, serial)

    def getTid(self, oid: bytes) -> bytes:
        return self._call("getTid", oid)

    def history(self, oid: bytes, size: int = 1, version: Any = None,
                timeout: float | None = None):
        return self._call("history", oid, size, timeout=timeout)

    def record_iternext(self, next: Any = None):
        return self._call("record_iternext", next)

    def new_oid(self) -> bytes:
        if self._is_read_only:
            raise ReadOnlyError()
        with self._oid_lock:
            if not self._oids:
                self._oids = list(reversed(self._call("new_oids")))
            return self._oids.pop()

    def pack(self, t: float | None = None, referencesf: Any = None, wait: Any = 1,
             days: float = 0, timeout: float | None = None) -> None:
        """Pack the server's storage; ``timeout`` bounds the wait for the reply (seconds)."""
        if t is None:
            t = time.time()
        t -= days * 86400
        self._call("pack", t, wait, timeout=timeout)

    def undoLog(self, first: int = 0, last: int = -20, filter: Any = None,
                timeout: float | None = None):
        if filter is not None:
            return []
        return list(self._call("undoLog", first, last, timeout=timeout))

    def undoInfo(self, first: int = 0, last: int = -20, specification: Any = None,
                 timeout: float | None = None):
        return list(self._call("undoInfo", first, last, specification, timeout=timeout))

    def iterator(self, start: bytes | None = None, stop: bytes | None = None):
        conn = self._connection()
        self._flush_iterator_garbage(conn)
        iid = conn.call_sync("iterator_start", start, stop)
        return TransactionIterator(self, conn, iid)

    def _flush_iterator_garbage(self, conn: Connection) -> None:
        garbage, self._iterator_garbage = self._iterator_garbage, []
        if garbage:
            try:
                conn.call_oneway("iterator_gc", garbage)
            except ClientDisconnected:
                pass

    def copyTransactionsFrom(self, other: Any, verbose: int = 0) -> None:
        ZODB.BaseStorage.copy(other, self, verbose)

    # -- two-phase commit ------------------------------------------------------------------

    def _check_trans(self, txn: Any, meth: str) -> Connection:
        if self._is_read_only:
            raise ReadOnlyError()
        if self._txn is not txn or txn is None:
            raise StorageTransactionError(self, txn)
        conn = self._txn_conn
        if self._txn_generation != self._generation or conn is None or conn.closed:
            raise ClientDisconnected(meth, "on a disconnected transaction")
        return conn

    def tpc_begin(self, txn: Any, tid: bytes | None = None, status: str = " ") -> None:
        if self._is_read_only:
            raise ReadOnlyError()
        if self._txn is txn:
            raise StorageTransactionError("Duplicate tpc_begin calls for same transaction")
        self._tpc_lock.acquire()
        try:
            conn = self._connection()
            self._txn = txn
            self._txn_conn = conn
            self._txn_generation = self._generation
            self._txn_buffer = {}
            self._txn_resolved = set()
            ext = getattr(txn, "extension", None)
            conn.call_oneway(
                "tpc_begin", id(txn), _bytes(txn.user), _bytes(txn.description),
                dict(ext) if ext else {}, tid, status, hold=True)
        except BaseException:
            self._end_txn()
            raise

    def _end_txn(self) -> None:
        self._txn = None
        self._txn_conn = None
        self._txn_buffer = {}
        self._txn_resolved = set()
        if self._blobs is not None:
            self._blobs.abort()  # staged blob files not committed
        if self._tpc_lock.locked():
            self._tpc_lock.release()

    def store(self, oid: bytes, serial: bytes, data: bytes, version: str, txn: Any) -> None:
        conn = self._check_trans(txn, "store")
        conn.call_oneway("storea", oid, serial or z64, data, id(txn), hold=True)
        self._txn_buffer[oid] = data

    def checkCurrentSerialInTransaction(self, oid: bytes, serial: bytes, txn: Any) -> None:
        conn = self._check_trans(txn, "checkCurrentSerialInTransaction")
        conn.call_oneway("checkCurrentSerialInTransaction", oid, serial, id(txn), hold=True)

    def deleteObject(self, oid: bytes, serial: bytes, txn: Any) -> None:
        conn = self._check_trans(txn, "deleteObject")
        conn.call_oneway("deleteObject", oid, serial, id(txn), hold=True)
        self._txn_buffer[oid] = None

    def restore(self, oid: bytes, serial: bytes, data: bytes | None, version: str,
                prev_txn: bytes | None, txn: Any) -> None:
        conn = self._check_trans(txn, "restore")
        conn.call_oneway("restorea", oid, serial, data, prev_txn, id(txn), hold=True)
        self._txn_buffer[oid] = None

    def undo(self, transaction_id: bytes, txn: Any) -> None:
        """Queue an undo; the undone oids come back from :meth:`tpc_vote`."""
        conn = self._check_trans(txn, "undo")
        conn.call_oneway("undoa", transaction_id, id(txn), hold=True)

    def tpc_vote(self, txn: Any) -> list[bytes]:
        """Vote, resolving conflicts the server hands back; return the resolved/undone oids."""
        conn = self._check_trans(txn, "tpc_vote")
        for _attempt in range(MAX_VOTE_ATTEMPTS):
            try:
                result = conn.call_sync("vote", id(txn))
            except ConflictError as e:
                if e.oid:
                    self._cache.invalidate(e.oid, None)
                raise
            conflicts = []
            for item in result or ():
                if isinstance(item, dict):
                    conflicts.append(item)
                else:
                    self._txn_resolved.add(item)
                    self._txn_buffer[item] = None
            if not conflicts:
                return list(self._txn_resolved)
            for c in conflicts:
                oid = c["oid"]
                committed, read = c["serials"]
                data = c.get("data")
                if data is None:
                    data = self._txn_buffer.get(oid)
                try:
                    resolved = self.tryToResolveConflict(oid, committed, read, data)
                except ConflictError:
                    self._cache.invalidate(oid, None)
                    raise
                conn.call_oneway("storea", oid, committed, resolved, id(txn), hold=True)
                self._txn_resolved.add(oid)
                self._txn_buffer[oid] = None
        raise ConflictError(f"conflicts still unresolved after {MAX_VOTE_ATTEMPTS} votes")

    def tpc_finish(self, txn: Any, f: Any = None) -> bytes:
        """Finish the commit; the cache and ``f(tid)`` are updated before ``tid`` is returned."""
        conn = self._check_trans(txn, "tpc_finish")
        buffer = self._txn_buffer
        cache = self._cache

        def finished(tid: Any) -> Any:  # reader thread, before later invalidations
            if tid is None:
                raise StorageTransactionError("the server had no transaction to finish")
            try:
                for oid, data in buffer.items():
                    cache.invalidate(oid, tid)
                    if data is not None:
                        cache.store(oid, tid, None, data)
            except Exception:
                logger.exception("cache update after commit failed; clearing the cache")
                cache.clear()
            if self._blobs is not None:
                self._blobs.finish(tid)  # staged blob files join the blob cache
            # ZODB's callback records the invalidations for the DB's other connections.
            # lastTransaction() waits on this lock, so no connection can open at tid before
            # they are recorded (ZODB >= 5.6, ZEO #166), and then it sees tid.
            with self._last_tid_lock:
                cache.setLastTid(tid)
                if f is not None:
                    f(tid)
            return tid

        try:
            return conn.call("tpc_finish", id(txn), on_reply=finished).wait()
        finally:
            self._end_txn()

    def tpc_abort(self, txn: Any, timeout: float | None = None) -> None:
        if self._txn is not txn or txn is None:
            return
        try:
            conn = self._txn_conn
            if conn is not None and not conn.closed:
                conn.call_sync("tpc_abort", id(txn), timeout=timeout)
        except ClientDisconnected:
            pass
        finally:
            self._end_txn()

    def tpc_transaction(self) -> Any:
        return self._txn

    # -- blobs (ZEO.client.blob does the work) ------------------------------------------------

    def _blob_store(self) -> BlobStore:
        if self._blobs is None:
            raise POSKeyError("this ClientStorage has no blob_dir")
        return self._blobs

    def storeBlob(self, oid: bytes, serial: bytes, data: bytes, blobfilename: str,
                  version: str, txn: Any) -> None:
        """Store the record, then upload the blob file now (before the vote)."""
        blobs = self._blob_store()
        self.store(oid, serial, data, version, txn)
        conn = self._txn_conn
        assert conn is not None  # store() checked the transaction
        blobs.store(conn.call_oneway, oid, serial or z64, data, blobfilename,
                    id(txn))

    def _send_blob(self, oid: bytes, serial: bytes) -> None:
        self._call("sendBlob", oid, serial)

    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        return self._blob_store().load(oid, serial, self._send_blob)

    def openCommittedBlobFile(self, oid: bytes, serial: bytes, blob: Any = None) -> Any:
        return self._blob_store().open_committed(oid, serial, self._send_blob, blob)


class ClientTransaction(ZODB.BaseStorage.TransactionRecord):
    """One transaction from a server-side iterator; iterate it for its data records."""

    def __init__(self, storage: ClientStorage, conn: Connection, iid: int, tid: bytes,
                 status: str, user: bytes, description: bytes, extension: dict) -> None:
        super().__init__(tid, status, user, description, extension)
        self._storage = storage
        self._conn = conn
        self._iid = iid

    def __iter__(self) -> Iterator[ZODB.BaseStorage.DataRecord]:
        conn = self._conn
        riid = conn.call_sync("iterator_record_start", self._iid, self.tid)
        while True:
            if conn.closed:
                raise ClientDisconnected("iterator used after a disconnect")
            r = conn.call_sync("iterator_record_next", riid)
            if r is None:
                return
            oid, tid, data, data_txn = r
            yield ZODB.BaseStorage.DataRecord(oid, tid, data, data_txn)


class TransactionIterator:
    """The ``iterator()`` of a ClientStorage: transactions fetched one by one."""

    def __init__(self, storage: ClientStorage, conn: Connection, iid: int) -> None:
        self._storage = storage
        self._conn = conn
        self._iid = iid
        self._ended = False

    def __iter__(self) -> TransactionIterator:
        return self

    def __next__(self) -> ClientTransaction:
        if self._ended:
            raise StopIteration
        if self._conn.closed:
            self._ended = True
            raise ClientDisconnected("iterator used after a disconnect")
        r = self._conn.call_sync("iterator_next", self._iid)
        if r is None:
            self._ended = True  # the server forgot the iterator already
            raise StopIteration
        tid, status, user, description, extension = r
        return ClientTransaction(self._storage, self._conn, self._iid, tid, status, user,
                                 description, extension)

    def close(self) -> None:
        if not self._ended:
            self._ended = True
            self._storage._iterator_garbage.append(self._iid)

    def __del__(self) -> None:
        # Never send from here (a finalizer may run while this thread holds the send lock).
        if not self._ended:
            self._ended = True
            self._storage._iterator_garbage.append(self._iid)


def check_blob_size_script(args: Any = None) -> None:
    """Prune a blob cache directory to a target size: ``[blob_dir, target_bytes]``."""
    from .blob import check_blob_size_script as prune_script

    prune_script(args)
