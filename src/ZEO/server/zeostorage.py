"""The ZEO storage API one client connection calls: registration, reads, iterators, the
transaction's buffered writes, blob transfers, and the hand-over to the commit path.

A :class:`ZEOStorage` belongs to one :class:`~ZEO.server.session.Session` (the asyncio
protocol that decodes calls and writes replies) and knows nothing of framing or sockets: its
methods take decoded arguments and return a result, an asyncio future, or :data:`LATER` when
the reply comes from the commit path through a :class:`~ZEO.server.session.PendingReply`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ZODB.POSException import ReadOnlyError, StorageTransactionError

from ..protocol.errors import peer_repr
from .commit import (
    CHECK,
    DELETE,
    RECORD_OVERHEAD,
    RESTORE,
    STORE,
    UNDO,
    ServerTransaction,
    TxnPhase,
)

if TYPE_CHECKING:
    from .session import Session
    from .storage_server import StorageServer, StorageState

logger = logging.getLogger("ZEO.StorageServer")

BLOB_CHUNK_SIZE = 59000
#: Longest client label and storage name kept or logged.
MAX_LABEL = 256
#: Highest oid a client may write: the oid counter must stay usable after it (``\xff`` * 8
#: would make every later ``new_oid`` fail, in every client, across restarts).
MAX_OID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
#: Transaction statuses a storage understands (restores copy them from another storage).
_STATUSES = (" ", "p", "u", "c")

#: A method's result when its :class:`~ZEO.server.session.PendingReply` will answer.
LATER = object()

#: Methods a registered connection answers (zeo-facts §2.1); each is a ZEOStorage method.
REGISTERED_METHODS = (
    "get_info", "lastTransaction", "getInvalidations", "new_oids", "pack", "loadBefore",
    "storea", "checkCurrentSerialInTransaction", "restorea", "storeBlobStart",
    "storeBlobChunk", "storeBlobEnd", "storeBlobShared", "deleteObject", "tpc_begin", "vote",
    "tpc_finish", "tpc_abort", "history", "record_iternext", "sendBlob", "getTid",
    "loadSerial", "new_oid", "undoa", "undoLog", "undoInfo", "iterator_start",
    "iterator_next", "iterator_record_start", "iterator_record_next", "iterator_gc",
    "server_status", "set_client_label", "ping",
)


class ZEOStorage:
    """The ZEO API of one client connection (ZEO's own name for it).

    Until :meth:`register` succeeds only ``register`` is callable; ``state`` and ``storage``
    are then the registered storage's.  It lives on the loop thread; the commit path calls
    back :meth:`transaction_ended`, :attr:`label` and :meth:`close`.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.server: StorageServer = session.server
        self.loop = session.loop
        self.state: StorageState | None = None
        self.storage: Any = None
        self.read_only = False
        self.authorized_read_only = False  # ZEO.server.auth: the certificate may only read
        self.txn: ServerTransaction | None = None
        self._iterators: dict[int, Any] = {}
        self._iterator_last: dict[int, Any] = {}
        self._next_iterator_id = 0
        self._blob_upload: tuple[Any, str] | None = None
        self._iteration_lock: asyncio.Lock | None = None  # MVCC storages: one step at a time

    @property
    def registered(self) -> StorageState:
        """The registered storage's state (only registered calls are dispatched here)."""
        state = self.state
        assert state is not None
        return state

    @property
    def label(self) -> str:
        """The connection's name in log lines."""
        return self.session.label

    def close(self) -> None:
        """Close the connection (the commit path's transaction timeout)."""
        self.session.close()

    def connection_lost(self) -> None:
        """The connection is gone: abort its transaction, drop its uploads and iterators."""
        txn = self.txn
        if txn is not None:
            logger.warning("(%s) disconnected during %s transaction", self.label,
                           "locked" if txn.holds_lock else "unlocked")
            assert self.state is not None
            self.state.commits.abort(self, txn, None)
        self._close_blob_upload()
        self.server.open_iterators -= len(self._iterators)
        self._iterators.clear()
        self._iterator_last.clear()

    # -- registration ----------------------------------------------------------------

    def register(self, storage_id: str, read_only: Any) -> bytes:
        if type(storage_id) is not str or len(storage_id) > MAX_LABEL:
            raise ValueError(f"unknown storage: {peer_repr(storage_id, 60)}")
        state = self.server.states.get(storage_id)
        authorization = self.server.authorization
        if authorization is not None and state is not None:  # ZEO.server.auth
            from .auth import NONE, READ_ONLY, identity_of

            access = authorization.access(identity_of(self.session.transport), storage_id)
            if access == NONE:
                state = None  # refused exactly like an unknown storage
            self.authorized_read_only = access == READ_ONLY
        if state is None:
            raise ValueError(f"unknown storage: {storage_id}")
        if state.refused is not None:
            raise StorageTransactionError(f"storage {storage_id!r} is not served: "
                                          f"{state.refused}")
        read_only = bool(read_only)
        if not read_only and (self.server.read_only or state.storage.isReadOnly()
                              or self.authorized_read_only):
            raise ReadOnlyError()
        self.state = state
        self.storage = state.storage
        self.read_only = read_only or self.server.read_only or bool(state.storage.isReadOnly())
        self.session.registered(state)
        logger.info("(%s) registered on storage %r%s", self.label, storage_id,
                    " read-only" if self.read_only else "")
        return self._caught_up()

    def _caught_up(self) -> Any:
        """The published tid; for an MVCC storage, once every commit the database holds
        (other servers' too) is published: a future."""
        state = self.state
        assert state is not None
        if not state.mvcc:
            return state.published_tid

        async def caught_up() -> bytes:
            try:
                await state.catch_up()
            except Exception:
                logger.warning("(%s) catching up with the database failed", self.label,
                               exc_info=True)
            return state.published_tid

        return asyncio.ensure_future(caught_up(), loop=self.loop)

    def set_client_label(self, label: Any) -> None:
        if type(label) is not str:
            logger.warning("(%s) set_client_label with a %s: ignored", self.label,
                           type(label).__name__)
            return
        # Logged on every line of this connection: printable, and short.
        label = "".join(c if c.isprintable() else "?" for c in label[:MAX_LABEL])
        self.session.set_label(label)

    def ping(self) -> Any:
        # A client with server_sync pings at each transaction start: on an MVCC storage the
        # reply then follows every commit the database held (other servers' too).
        if self.state is not None and self.state.mvcc:
            fut = self._caught_up()
            return asyncio.ensure_future(_nothing(fut), loop=self.loop)
        return None

    def server_status(self) -> dict:
        assert self.state is not None
        return self.state.status()

    # -- reads (inline on the loop) ------------------------------------------------------

    def get_info(self) -> dict:
        assert self.state is not None
        return self.state.info()

    def lastTransaction(self) -> Any:
        return self._caught_up()

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:
        state = self.state
        assert state is not None
        state.stats_loads += 1
        if state.mvcc:
            state.load_mvcc(oid, tid, self.session.reply_later())
            return LATER
        if state.commits.finishing:  # the storage may block readers during a finish
            state.commits.load_behind_finish(oid, tid, self.session.reply_later())
            return LATER
        return self.storage.loadBefore(oid, tid)

    def getInvalidations(self, tid: bytes) -> Any:
        assert self.state is not None
        return self.state.get_invalidations(tid)

    # -- reads that may wait on the storage lock: off the loop -----------------------

    def _offload(self, func: Callable, *args: Any) -> asyncio.Future:
        return self.loop.run_in_executor(self.server.read_executor, func, *args)

    def loadSerial(self, oid: bytes, serial: bytes) -> asyncio.Future:
        return self._offload(self.storage.loadSerial, oid, serial)

    def getTid(self, oid: bytes) -> asyncio.Future:
        return self._offload(self.storage.getTid, oid)

    def history(self, oid: bytes, size: int = 1) -> asyncio.Future:
        return self._offload(lambda: self.storage.history(oid, size=size))

    def record_iternext(self, next: Any = None) -> Any:
        return self._offload(self.storage.record_iternext, next)

    def new_oids(self, n: int = 100) -> asyncio.Future:
        if self.read_only:
            raise ReadOnlyError()
        n = min(n, 100)
        if n <= 0:
            n = 1
        new_oid = self.storage.new_oid
        return self._offload(lambda: [new_oid() for _ in range(n)])

    def new_oid(self) -> None:
        # Registered but never implemented, in ZEO too: the same error as ZEO's.
        raise AttributeError("'ZEOStorage' object has no attribute 'new_oid'")

    def undoLog(self, first: int = 0, last: int = -20) -> Any:
        if not self.registered.supports_undo:
            return ()
        return self._offload(self.storage.undoLog, first, last)

    def undoInfo(self, first: int = 0, last: int = -20, spec: Any = None) -> Any:
        if not self.registered.supports_undo:
            return ()
        return self._offload(self.storage.undoInfo, first, last, spec)

    def pack(self, t: float, wait: Any = 1) -> Any:
        assert self.state is not None
        if self.authorized_read_only:  # a read-only connection may pack, not a ro certificate
            raise ReadOnlyError()
        fut = self.state.pack(t)
        if wait:
            return fut
        return None

    # -- iteration ---------------------------------------------------------------------

    def _new_iterator_id(self) -> int:
        iid = self._next_iterator_id
        self._next_iterator_id += 1
        return iid

    def _check_iterator_room(self) -> None:
        server = self.server
        if len(self._iterators) >= server.max_iterators:
            raise ValueError(f"more than {server.max_iterators} open iterators on one "
                             "connection (max-iterators)")
        if server.open_iterators >= server.max_open_iterators:
            raise ValueError(f"the server has {server.max_open_iterators} open iterators, "
                             "its limit: try again later")

    def _add_iterator(self, it: Any) -> int:
        """Keep ``it`` under a new id, within the per-connection and server-wide limits
        (each storage iterator may hold an open file)."""
        self._check_iterator_room()
        iid = self._new_iterator_id()
        self._iterators[iid] = it
        self.server.open_iterators += 1
        return iid

    def _drop_iterator(self, iid: Any) -> None:
        it = self._iterators.pop(iid, None)
        self._iterator_last.pop(iid, None)
        if it is not None:
            self.server.open_iterators -= 1
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    logger.exception("(%s) closing an iterator", self.label)

    def _iteration(self, func: Callable[..., Any], *args: Any,
                   then: Callable[[Any], Any]) -> Any:
        """``then(func(*args))``, where ``func`` is one step of a storage iterator: inline,
        or, for an MVCC storage (each step may be a database query), on a read thread with
        this connection's steps one at a time."""
        assert self.state is not None
        if not self.state.mvcc:
            return then(func(*args))
        if self._iteration_lock is None:
            self._iteration_lock = asyncio.Lock()
        lock = self._iteration_lock

        async def run() -> Any:
            async with lock:
                result = await self.loop.run_in_executor(self.server.read_executor, func,
                                                         *args)
            return then(result)

        return asyncio.ensure_future(run(), loop=self.loop)

    def iterator_start(self, start: Any = None, stop: Any = None) -> Any:
        _check_tid_arg(start)
        _check_tid_arg(stop)
        self._check_iterator_room()
        storage = self.storage
        return self._iteration(lambda: iter(storage.iterator(start, stop)),
                               then=self._add_iterator)

    def _iterator(self, iid: Any) -> Any:
        it = self._iterators.get(iid) if type(iid) is int else None
        if it is None:
            raise KeyError(iid if type(iid) is int else peer_repr(iid, 40))
        return it

    def iterator_next(self, iid: int) -> Any:
        def reply(txn: Any) -> Any:
            if txn is _END:
                self._drop_iterator(iid)
                return None
            self._iterator_last[iid] = txn
            return (txn.tid, txn.status, txn.user, txn.description, txn.extension)

        return self._iteration(_step, self._iterator(iid), then=reply)

    def iterator_record_start(self, txn_iid: int, tid: bytes) -> Any:
        txn = self._iterator_last.get(txn_iid) if type(txn_iid) is int else None
        if txn is None or txn.tid != tid:
            raise Exception(f"Out-of-order request for records of {peer_repr(tid, 40)}")
        return self._iteration(iter, txn, then=self._add_iterator)

    def iterator_record_next(self, riid: int) -> Any:
        def reply(rec: Any) -> Any:
            if rec is _END:
                self._drop_iterator(riid)
                return None
            return (rec.oid, rec.tid, rec.data, rec.data_txn)

        return self._iteration(_step, self._iterator(riid), then=reply)

    def iterator_gc(self, iids: Any) -> None:
        for iid in iids:
            if type(iid) is int:
                self._drop_iterator(iid)

    # -- the transaction: buffered writes ------------------------------------------------

    def _check_txn(self, txn_id: Any) -> ServerTransaction:
        txn = self.txn
        if txn is None:
            raise StorageTransactionError(None, txn_id)
        if txn.txn_id != txn_id:
            raise StorageTransactionError(txn.txn_id, txn_id)
        if txn.phase is not TxnPhase.OPEN:
            raise StorageTransactionError("transaction is past its buffering phase")
        return txn

    def _buffer(self, txn: ServerTransaction, record: tuple, size: int) -> None:
        """Buffer ``record`` (``size`` bytes of data); past the memory budget it goes to the
        transaction's spool file.  Every record counts toward ``max-transaction-size``."""
        server = self.server
        size += RECORD_OVERHEAD
        limit = server.max_transaction_size
        if limit and txn.nbytes + size > limit:
            raise StorageTransactionError(
                f"transaction buffers more than {limit} bytes (max-transaction-size)")
        txn.add(record, size, server.transaction_memory, server.spool_dir)

    def _writable_txn(self, txn_id: Any, oid: Any, serial: Any) -> ServerTransaction:
        """The open transaction ``txn_id``, after checking a write's oid and serial."""
        txn = self._check_txn(txn_id)
        _check_oid(oid)
        if type(serial) not in (bytes, str):  # the storage compares it; a spool keeps it
            raise StorageTransactionError(f"a serial is bytes, not {type(serial).__name__}")
        return txn

    def tpc_begin(self, txn_id: Any, user: bytes = b"", description: bytes = b"",
                  extension: Any = None, tid: bytes | None = None, status: str = " ") -> None:
        if self.read_only:
            raise ReadOnlyError()
        if self.txn is not None:
            if self.txn.txn_id == txn_id:
                return  # a duplicate begin
            raise StorageTransactionError(
                "Multiple simultaneous tpc_begin requests from one client."
            )
        if tid is not None:
            # Only restores (copyTransactionsFrom) name their tid.  One after every commit
            # (checked again under the commit lock) and below ZODB's largest keeps the
            # storage usable; ``\xff`` * 8 would end it for everyone.
            if type(tid) is not bytes or len(tid) != 8 or tid >= MAX_OID:
                raise StorageTransactionError(f"bad transaction id {peer_repr(tid, 40)}")
            if tid <= self.registered.published_tid:
                raise StorageTransactionError(
                    f"transaction id {tid.hex()} is not after the last committed one")
        if status not in _STATUSES:
            raise StorageTransactionError(f"bad transaction status {peer_repr(status, 20)}")
        for value in (user, description):
            if type(value) not in (bytes, str):
                raise StorageTransactionError("user and description are bytes or text")
        if extension is not None and type(extension) is not dict:
            raise StorageTransactionError("a transaction extension is a dict")
        self.txn = ServerTransaction(txn_id, user, description, dict(extension or {}), tid,
                                     status)
        self.registered.stats_active_txns += 1

    def storea(self, oid: bytes, serial: bytes, data: Any, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        data = _record_data(data)
        self.registered.stats_stores += 1
        self._buffer(txn, (STORE, oid, serial, data), len(data) if data else 0)

    def checkCurrentSerialInTransaction(self, oid: bytes, serial: bytes, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        self._buffer(txn, (CHECK, oid, serial), 0)

    def restorea(self, oid: bytes, serial: bytes, data: Any, prev_txn: Any, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        data = _record_data(data)
        if prev_txn is not None:
            _check_tid_arg(prev_txn)
        self.registered.stats_stores += 1
        self._buffer(txn, (RESTORE, oid, serial, data, prev_txn), len(data) if data else 0)

    def deleteObject(self, oid: bytes, serial: bytes, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        self.registered.stats_stores += 1
        self._buffer(txn, (DELETE, oid, serial), 0)

    def undoa(self, undone_tid: bytes, txn_id: Any) -> None:
        txn = self._check_txn(txn_id)
        if type(undone_tid) not in (bytes, str):  # an id from undoLog (base64 of the tid)
            raise StorageTransactionError("an undo id is bytes or text")
        self._buffer(txn, (UNDO, undone_tid), 0)

    # -- blob uploads ----------------------------------------------------------------

    def _close_blob_upload(self) -> None:
        if self._blob_upload is not None:
            f, path = self._blob_upload
            self._blob_upload = None
            f.close()
            try:
                os.remove(path)
            except OSError:
                pass

    def _blob_txn(self) -> ServerTransaction:
        """The open transaction a blob upload belongs to: uploads are writes."""
        if self.read_only:
            raise ReadOnlyError()
        txn = self.txn
        if txn is None or txn.phase is not TxnPhase.OPEN:
            raise StorageTransactionError("blob upload outside a transaction")
        return txn

    def storeBlobStart(self) -> None:
        self._blob_txn()
        self._close_blob_upload()
        fd, path = tempfile.mkstemp(suffix=".tmp", dir=self.storage.temporaryDirectory())
        self._blob_upload = (os.fdopen(fd, "wb"), path)

    def storeBlobChunk(self, chunk: bytes) -> None:
        if self._blob_upload is None:
            raise StorageTransactionError("storeBlobChunk without storeBlobStart")
        if type(chunk) is not bytes:
            raise StorageTransactionError("a blob chunk is bytes")
        txn = self._blob_txn()
        limit = self.server.max_transaction_size
        txn.nbytes += len(chunk)
        if limit and txn.nbytes > limit:
            raise StorageTransactionError(
                f"transaction sends more than {limit} bytes (max-transaction-size)")
        self._blob_upload[0].write(chunk)

    def storeBlobEnd(self, oid: bytes, serial: bytes, data: Any, txn_id: Any) -> None:
        if self._blob_upload is None:
            raise StorageTransactionError("storeBlobEnd without storeBlobStart")
        f, path = self._blob_upload
        self._blob_upload = None
        f.close()
        try:
            txn = self._writable_txn(txn_id, oid, serial)
            data = _record_data(data)
        except Exception:
            os.remove(path)
            raise
        txn.nbytes += RECORD_OVERHEAD
        txn.blobs.append((oid, serial, data, path))

    def storeBlobShared(self, oid: bytes, serial: bytes, data: bytes, filename: str,
                        txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        if (
            not isinstance(filename, str)
            or os.sep in filename
            or (os.altsep and os.altsep in filename)
            or filename in ("", ".", "..")
            or not (filename.endswith(".tmp") or filename[:-1].endswith(".tmp"))
        ):
            logger.critical("(%s) storeBlobShared with a bad file name %s: refused",
                            self.label, peer_repr(filename, 100))
            raise ValueError(f"bad blob file name {peer_repr(filename, 100)}")
        helper = getattr(self.storage, "fshelper", None)
        if helper is None:
            raise ValueError("this storage has no shared blob directory")
        path = os.path.join(helper.getPathForOID(oid), filename)
        txn.blobs.append((oid, serial, data, path))

    async def _send_blob(self, oid: bytes, serial: bytes) -> None:
        assert self.state is not None
        if self.state.mvcc:  # a database round trip (and a download, blobs in the database)
            path = await self.loop.run_in_executor(self.server.read_executor,
                                                   self.storage.loadBlob, oid, serial)
        else:
            path = self.storage.loadBlob(oid, serial)
        session = self.session
        send = session.send_oneway
        with open(path, "rb") as f:
            send("receiveBlobStart", (oid, serial))
            while True:
                chunk = f.read(BLOB_CHUNK_SIZE)
                if not chunk:
                    break
                send("receiveBlobChunk", (oid, serial, chunk))
                await session.writable()
                if session.closed:
                    return
            send("receiveBlobStop", (oid, serial))

    def sendBlob(self, oid: bytes, serial: bytes) -> asyncio.Future:
        return asyncio.ensure_future(self._send_blob(oid, serial), loop=self.loop)

    # -- the transaction: vote, finish, abort ----------------------------------------

    def vote(self, txn_id: Any) -> object:
        txn = self.txn
        if txn is None or txn.txn_id != txn_id:
            raise StorageTransactionError(txn.txn_id if txn else None, txn_id)
        if txn.phase is TxnPhase.WAITING:
            raise StorageTransactionError("Already voting (waiting)")
        if txn.phase is not TxnPhase.OPEN:
            raise StorageTransactionError("Already voting (locked)")
        assert self.state is not None
        self.state.commits.vote(self, txn, self.session.reply_later())
        return LATER

    def tpc_finish(self, txn_id: Any) -> Any:
        txn = self.txn
        if txn is None or txn.txn_id != txn_id:
            logger.warning("(%s) tpc_finish for a transaction that is not current",
                           self.label)
            return None
        if txn.phase is not TxnPhase.VOTED:
            raise StorageTransactionError("tpc_finish before a successful vote")
        assert self.state is not None
        self.state.commits.finish(self, txn, self.session.reply_later())
        return LATER

    def tpc_abort(self, txn_id: Any) -> Any:
        txn = self.txn
        if txn is None or txn.txn_id != txn_id:
            return None
        assert self.state is not None
        self.state.commits.abort(self, txn, self.session.reply_later())
        return LATER

    def transaction_ended(self, txn: ServerTransaction) -> None:
        """Called by the storage state once ``txn`` committed or aborted."""
        if self.txn is txn:
            self.txn = None
        txn.move_to(TxnPhase.ENDED)


async def _nothing(fut: Any) -> None:
    await fut


_END = object()  # an iterator's end, as a step's result


def _step(it: Any) -> Any:
    """The next item of ``it``, or :data:`_END`."""
    try:
        return next(it)
    except StopIteration:
        return _END


def _check_oid(oid: Any) -> None:
    """An oid a client writes: 8 bytes, at most :data:`MAX_OID`."""
    if type(oid) is not bytes or len(oid) != 8:
        raise StorageTransactionError(f"an oid is 8 bytes, not {peer_repr(oid, 40)}")
    if oid > MAX_OID:
        raise StorageTransactionError(f"oid {oid.hex()} is above the highest allowed, "
                                      f"{MAX_OID.hex()}")


def _check_tid_arg(tid: Any) -> None:
    if tid is not None and (type(tid) is not bytes or len(tid) != 8):
        raise ValueError(f"a transaction id is 8 bytes, not {peer_repr(tid, 40)}")


def _record_data(data: Any) -> bytes | None:
    """A record's data as it will be buffered: bytes (``zodbpickle.binary`` made plain), or
    None (a restore of a deletion)."""
    if data is None or type(data) is bytes:
        return data
    if isinstance(data, bytes):
        return bytes(data)
    raise StorageTransactionError(f"record data is bytes, not {type(data).__name__}")
