"""One client connection to the server: an asyncio Protocol over the sans-I/O core.

A :class:`Session` decodes calls, dispatches them to its ZEO method table, and writes replies.
Reads run inline on the loop (see docs/design.rst); the commit path runs on the storage's
commit worker thread.  Errors in one session never reach another.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ZODB.POSException import (
    ConflictError,
    POSKeyError,
    ReadConflictError,
    ReadOnlyError,
    StorageTransactionError,
)

from ..protocol import Handshake, RemoteProtocolError, RuokRequest, ServerConnection
from ..protocol.errors import LocalProtocolError
from .commit import CHECK, DELETE, RESTORE, STORE, UNDO, ServerTransaction, Spool, TxnPhase

if TYPE_CHECKING:
    from .storage_server import StorageServer, StorageState

logger = logging.getLogger("ZEO.server")

BLOB_CHUNK_SIZE = 59000
# Exceptions that are part of normal operation: never logged as errors.
_QUIET = (POSKeyError, ConflictError, ReadConflictError)

#: Methods a registered session answers (zeo-facts §2.1), mapped to the Session method name.
REGISTERED_METHODS = (
    "get_info", "lastTransaction", "getInvalidations", "new_oids", "pack", "loadBefore",
    "storea", "checkCurrentSerialInTransaction", "restorea", "storeBlobStart",
    "storeBlobChunk", "storeBlobEnd", "storeBlobShared", "deleteObject", "tpc_begin", "vote",
    "tpc_finish", "tpc_abort", "history", "record_iternext", "sendBlob", "getTid",
    "loadSerial", "new_oid", "undoa", "undoLog", "undoInfo", "iterator_start",
    "iterator_next", "iterator_record_start", "iterator_record_next", "iterator_gc",
    "server_status", "set_client_label", "ping",
)


def set_keepalive(sock: socket.socket, seconds: float | None) -> None:
    """Make the kernel give up on a peer that stays silent for about ``seconds``.

    Keepalive probes start after half of it and three unanswered probes end the connection;
    TCP_USER_TIMEOUT also ends it when sent data stays unacknowledged that long.  A live
    client's kernel answers both whatever its application does, so only dead peers (power
    loss, a cut network: half-open connections) are dropped, and with them their commit lock.
    """
    if not seconds:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(seconds / 2)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(seconds / 6)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


class OnewaysThenReply:
    """A deferred result that sends one-way calls to the caller just before the reply."""

    __slots__ = ("oneways", "value")

    def __init__(self, oneways: tuple[tuple[str, tuple], ...], value: Any) -> None:
        self.oneways = oneways
        self.value = value


class PendingReply:
    """The reply to a call that completes later on the loop thread (vote, tpc_finish).

    It is written the moment it is settled, in the same loop turn: an asyncio future would
    hand it to its done callbacks one turn later, and on the commit path every turn is time
    the commit lock is held.
    """

    __slots__ = ("session", "msgid", "oneway", "name")

    def __init__(self, session: Session, msgid: Any, oneway: bool, name: str) -> None:
        self.session = session
        self.msgid = msgid
        self.oneway = oneway
        self.name = name

    def resolve(self, value: Any) -> None:
        session = self.session
        if session.closed or self.oneway:
            return
        if type(value) is OnewaysThenReply:
            conn = session.conn
            session.write_all([conn.send_oneway(n, a) for n, a in value.oneways]
                              + [conn.send_reply(self.msgid, value.value)])
        else:
            session._reply(self.msgid, value)

    def fail(self, exc: BaseException) -> None:
        if not self.session.closed:
            self.session._call_failed(self.msgid, self.oneway, self.name, exc)


LATER = object()  # a method's result: its PendingReply will answer


class Session(asyncio.Protocol):
    """The server side of one client connection."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server
        self.loop = server.event_loop
        self.transport: asyncio.Transport | None = None
        self.conn = ServerConnection(server.announce, server.max_message_size)
        self.peer = "?"
        self.label = "?"
        self.state: StorageState | None = None
        self.storage: Any = None
        self.read_only = False
        self.authorized_read_only = False  # ZEO.server.auth: the certificate may only read
        self.txn: ServerTransaction | None = None
        self.closed = False
        self._batch: list[bytes] | None = None
        self._current: tuple = (None, 0, "", ())  # the message being dispatched
        self._methods: dict[str, Callable] = {"register": self.register}
        self._iterators: dict[int, Any] = {}
        self._iterator_last: dict[int, Any] = {}
        self._next_iterator_id = 0
        self._blob_upload: tuple[Any, str] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._register_timer: asyncio.TimerHandle | None = None
        self.connected_at = time.time()
        self.calls = 0
        self.bytes_in = 0
        self.bytes_out = 0

    # -- transport glue ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                set_keepalive(sock, self.server.tcp_keepalive)
            except OSError:
                pass
            self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        else:
            self.peer = str(peer or transport.get_extra_info("sockname") or "unix")
        self.label = self.peer
        server = self.server
        if not server.session_opened(self):
            logger.warning("(%s) refused: %d connections is the maximum", self.peer,
                           server.max_connections)
            self.close()
            return
        transport.set_write_buffer_limits(high=1 << 20)  # type: ignore[attr-defined]
        if server.register_timeout:
            self._register_timer = self.loop.call_later(server.register_timeout,
                                                        self._not_registered)
        transport.write(self.conn.greeting())  # type: ignore[attr-defined]

    def _not_registered(self) -> None:
        if self.state is None and not self.closed:
            logger.warning("(%s) did not register within %s seconds, closing", self.label,
                           self.server.register_timeout)
            self.close()

    def data_received(self, data: bytes) -> None:
        # Replies produced while handling this chunk leave in one write at the end.
        self._batch = batch = []
        self.bytes_in += len(data)
        try:
            for event in self.conn.receive_data(data):
                if type(event) is tuple:
                    self._handle_call(event)
                elif isinstance(event, Handshake):
                    logger.debug("(%s) handshake %r", self.label, event.protocol)
                elif isinstance(event, RuokRequest):
                    batch.append(self.conn.send_status(self.server.ruok()))
                    self._flush(batch)
                    self.close()
                    return
                if self.closed:
                    break
        except RemoteProtocolError as e:
            logger.error("(%s) protocol error, closing: %s", self.label, e)
            self._flush(batch)
            self.close()
            return
        finally:
            self._batch = None
        self._flush(batch)

    def _flush(self, batch: list[bytes]) -> None:
        if batch and self.transport is not None and not self.transport.is_closing():
            if len(batch) == 1:
                self.bytes_out += len(batch[0])
                self.transport.write(batch[0])
            else:
                self.bytes_out += sum(map(len, batch))
                self.transport.writelines(batch)
            if self.transport.get_write_buffer_size() > self.server.max_output_buffer:
                self._output_overflow()
        batch.clear()

    def write(self, frame: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(frame)
        elif self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(frame)
            self.transport.write(frame)
            if self.transport.get_write_buffer_size() > self.server.max_output_buffer:
                self._output_overflow()

    def write_all(self, frames: list[bytes]) -> None:
        """Write ``frames`` together (one write when no batch is open)."""
        batch = self._batch
        if batch is not None:
            batch.extend(frames)
        else:
            self._flush(frames)

    def reply_later(self) -> PendingReply:
        """The :class:`PendingReply` of the call being dispatched; the method returns LATER."""
        msgid, flags, name, _args = self._current
        return PendingReply(self, msgid, bool(flags), name)

    def _output_overflow(self) -> None:
        # The client does not read what we send (e.g. invalidations): drop it rather than
        # let its backlog grow without bound.
        logger.warning("(%s) more than %d bytes wait to be sent: the client is not reading, "
                       "closing", self.label, self.server.max_output_buffer)
        self.transport.abort()  # type: ignore[union-attr]
        self.closed = True

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        if self._register_timer is not None:
            self._register_timer.cancel()
        if self.txn is not None:
            txn = self.txn
            logger.warning(
                "(%s) disconnected during %s transaction", self.label,
                "locked" if txn.holds_lock else "unlocked",
            )
            self.state.abort(self, txn, None)  # type: ignore[union-attr]
        self._close_blob_upload()
        self._iterators.clear()
        self._iterator_last.clear()
        if self.state is not None:
            self.state.sessions.pop(self, None)
        self.server.session_closed(self)
        logger.info("(%s) disconnected", self.label)

    def close(self) -> None:
        """Close this connection (idempotent); cleanup happens in connection_lost."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    # -- dispatch ------------------------------------------------------------------------

    def _handle_call(self, msg: tuple) -> None:
        msgid, flags, name, args = msg
        self.calls += 1
        meth = self._methods.get(name)  # ".reply" is never a method: a client sends none
        if meth is None:
            logger.error("(%s) invalid method %r, closing", self.label, name)
            self.close()
            return
        if type(args) is not tuple:
            args = tuple(args) if isinstance(args, list) else (args,)
        self._current = msg
        try:
            result = meth(*args)
        except Exception as exc:
            self._call_failed(msgid, flags, name, exc)
            return
        if result is LATER:
            pass
        elif asyncio.isfuture(result):
            if flags:
                result.add_done_callback(lambda fut: self._deferred_oneway(name, fut))
            else:
                result.add_done_callback(lambda fut: self._deferred_reply(msgid, name, fut))
        elif not flags:
            self._reply(msgid, result)

    def _reply(self, msgid: Any, result: Any) -> None:
        try:
            self.write(self.conn.send_reply(msgid, result))
        except LocalProtocolError as e:
            logger.error("(%s) reply too large: %s", self.label, e)
            self.write(self.conn.send_error(msgid, ValueError(str(e))))

    def _call_failed(self, msgid: Any, oneway: Any, name: str, exc: BaseException) -> None:
        """A call raised ``exc``: a one-way call closes the connection (its client would
        never hear of the failure), a two-way call gets an error reply."""
        if oneway:
            logger.error("(%s) one-way call %r failed, closing: %r", self.label, name, exc)
            self.close()
            return
        self._log_failure(name, exc)
        self.write(self.conn.send_error(msgid, exc))

    def _deferred_oneway(self, name: str, fut: asyncio.Future) -> None:
        exc = None if fut.cancelled() else fut.exception()
        if exc is not None and not self.closed:
            self._call_failed(None, True, name, exc)

    def _deferred_reply(self, msgid: Any, name: str, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()  # always retrieved, even when nobody is left to tell
        if self.closed:
            return
        if exc is not None:
            self._call_failed(msgid, False, name, exc)
            return
        self._reply(msgid, fut.result())

    def _log_failure(self, name: str, exc: BaseException) -> None:
        """Log a failed call: conflicts and missing keys are normal; client misuse needs no
        traceback; anything else gets one."""
        if isinstance(exc, _QUIET):
            return
        expected = isinstance(exc, (ReadOnlyError, StorageTransactionError))
        logger.error("(%s) %r raised exception: %r", self.label, name, exc,
                     exc_info=None if expected else exc)

    def send_oneway(self, name: str, args: tuple) -> None:
        if not self.closed:
            self.write(self.conn.send_oneway(name, args))

    # -- registration ----------------------------------------------------------------

    def register(self, storage_id: str, read_only: Any) -> bytes:
        state = self.server.states.get(storage_id)
        authorization = self.server.authorization
        if authorization is not None and state is not None:  # ZEO.server.auth
            from .auth import NONE, READ_ONLY, identity_of

            access = authorization.access(identity_of(self.transport), storage_id)
            if access == NONE:
                state = None  # refused exactly like an unknown storage
            self.authorized_read_only = access == READ_ONLY
        if state is None:
            raise ValueError(f"unknown storage: {storage_id}")
        read_only = bool(read_only)
        if not read_only and (self.server.read_only or state.storage.isReadOnly()
                              or self.authorized_read_only):
            raise ReadOnlyError()
        self.state = state
        self.storage = state.storage
        self.read_only = read_only or self.server.read_only or bool(state.storage.isReadOnly())
        self._methods = {name: getattr(self, name) for name in REGISTERED_METHODS}
        state.sessions[self] = None
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None
        logger.info("(%s) registered on storage %r%s", self.label, storage_id,
                    " read-only" if self.read_only else "")
        return state.published_tid

    def set_client_label(self, label: Any) -> None:
        self.label = f"{label} {self.peer}"

    def ping(self) -> None:
        return None

    def server_status(self) -> dict:
        assert self.state is not None
        return self.state.status()

    # -- reads (inline on the loop) ------------------------------------------------------

    def get_info(self) -> dict:
        assert self.state is not None
        return self.state.info()

    def lastTransaction(self) -> bytes:
        assert self.state is not None
        return self.state.published_tid

    def loadBefore(self, oid: bytes, tid: bytes) -> Any:
        state = self.state
        assert state is not None
        state.stats_loads += 1
        if state.finishing:  # the storage may block readers until the finish is done
            state.load_behind_finish(oid, tid, self.reply_later())
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
        if not self.state.supports_undo:  # type: ignore[union-attr]
            return ()
        return self._offload(self.storage.undoLog, first, last)

    def undoInfo(self, first: int = 0, last: int = -20, spec: Any = None) -> Any:
        if not self.state.supports_undo:  # type: ignore[union-attr]
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

    def iterator_start(self, start: Any = None, stop: Any = None) -> int:
        iid = self._new_iterator_id()
        self._iterators[iid] = iter(self.storage.iterator(start, stop))
        return iid

    def iterator_next(self, iid: int) -> Any:
        it = self._iterators.get(iid)
        if it is None:
            raise KeyError(iid)
        try:
            txn = next(it)
        except StopIteration:
            del self._iterators[iid]
            self._iterator_last.pop(iid, None)
            return None
        self._iterator_last[iid] = txn
        return (txn.tid, txn.status, txn.user, txn.description, txn.extension)

    def iterator_record_start(self, txn_iid: int, tid: bytes) -> int:
        txn = self._iterator_last.get(txn_iid)
        if txn is None or txn.tid != tid:
            raise Exception(f"Out-of-order request for records of {tid!r}")
        riid = self._new_iterator_id()
        self._iterators[riid] = iter(txn)
        return riid

    def iterator_record_next(self, riid: int) -> Any:
        it = self._iterators.get(riid)
        if it is None:
            raise KeyError(riid)
        try:
            rec = next(it)
        except StopIteration:
            del self._iterators[riid]
            return None
        return (rec.oid, rec.tid, rec.data, rec.data_txn)

    def iterator_gc(self, iids: Any) -> None:
        for iid in iids:
            self._iterators.pop(iid, None)
            self._iterator_last.pop(iid, None)

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
        """Buffer ``record``; its data (item 3) goes to the spool past the memory budget."""
        txn.nbytes += size
        server = self.server
        limit = server.max_transaction_size
        if limit and txn.nbytes > limit:
            raise StorageTransactionError(
                f"transaction buffers more than {limit} bytes (max-transaction-size)")
        if size and txn.nbytes > server.transaction_memory:
            if txn.spool is None:
                txn.spool = Spool(server.spool_dir)
            record = (*record[:3], txn.spool.put(record[3]), *record[4:])
        txn.records.append(record)

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
        self.txn = ServerTransaction(txn_id, user, description, dict(extension or {}), tid,
                                     status)
        self.state.stats_active_txns += 1  # type: ignore[union-attr]

    def storea(self, oid: bytes, serial: bytes, data: bytes, txn_id: Any) -> None:
        txn = self._check_txn(txn_id)
        self.state.stats_stores += 1  # type: ignore[union-attr]
        self._buffer(txn, (STORE, oid, serial, data), len(data) if data else 0)

    def checkCurrentSerialInTransaction(self, oid: bytes, serial: bytes, txn_id: Any) -> None:
        txn = self._check_txn(txn_id)
        self._buffer(txn, (CHECK, oid, serial), 0)

    def restorea(self, oid: bytes, serial: bytes, data: Any, prev_txn: Any, txn_id: Any) -> None:
        txn = self._check_txn(txn_id)
        self.state.stats_stores += 1  # type: ignore[union-attr]
        self._buffer(txn, (RESTORE, oid, serial, data, prev_txn), len(data) if data else 0)

    def deleteObject(self, oid: bytes, serial: bytes, txn_id: Any) -> None:
        txn = self._check_txn(txn_id)
        self.state.stats_stores += 1  # type: ignore[union-attr]
        self._buffer(txn, (DELETE, oid, serial), 0)

    def undoa(self, undone_tid: bytes, txn_id: Any) -> None:
        txn = self._check_txn(txn_id)
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

    def storeBlobStart(self) -> None:
        self._close_blob_upload()
        fd, path = tempfile.mkstemp(suffix=".tmp", dir=self.storage.temporaryDirectory())
        self._blob_upload = (os.fdopen(fd, "wb"), path)

    def storeBlobChunk(self, chunk: bytes) -> None:
        if self._blob_upload is None:
            raise StorageTransactionError("storeBlobChunk without storeBlobStart")
        self._blob_upload[0].write(chunk)

    def storeBlobEnd(self, oid: bytes, serial: bytes, data: bytes, txn_id: Any) -> None:
        if self._blob_upload is None:
            raise StorageTransactionError("storeBlobEnd without storeBlobStart")
        f, path = self._blob_upload
        self._blob_upload = None
        f.close()
        try:
            txn = self._check_txn(txn_id)
        except Exception:
            os.remove(path)
            raise
        txn.blobs.append((oid, serial, data, path))

    def storeBlobShared(self, oid: bytes, serial: bytes, data: bytes, filename: str,
                        txn_id: Any) -> None:
        txn = self._check_txn(txn_id)
        if (
            not isinstance(filename, str)
            or os.sep in filename
            or (os.altsep and os.altsep in filename)
            or filename in ("", ".", "..")
            or not (filename.endswith(".tmp") or filename[:-1].endswith(".tmp"))
        ):
            logger.critical("(%s) storeBlobShared with a bad file name %r: refused",
                            self.label, filename)
            raise ValueError(f"bad blob file name {filename!r}")
        helper = getattr(self.storage, "fshelper", None)
        if helper is None:
            raise ValueError("this storage has no shared blob directory")
        path = os.path.join(helper.getPathForOID(oid), filename)
        txn.blobs.append((oid, serial, data, path))

    async def _send_blob(self, oid: bytes, serial: bytes) -> None:
        path = self.storage.loadBlob(oid, serial)
        send = self.send_oneway
        with open(path, "rb") as f:
            send("receiveBlobStart", (oid, serial))
            while True:
                chunk = f.read(BLOB_CHUNK_SIZE)
                if not chunk:
                    break
                send("receiveBlobChunk", (oid, serial, chunk))
                if not self._writable.is_set():
                    await self._writable.wait()
                if self.closed:
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
        self.state.vote(self, txn, self.reply_later())
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
        self.state.finish(self, txn, self.reply_later())
        return LATER

    def tpc_abort(self, txn_id: Any) -> Any:
        txn = self.txn
        if txn is None or txn.txn_id != txn_id:
            return None
        assert self.state is not None
        self.state.abort(self, txn, self.reply_later())
        return LATER

    def transaction_ended(self, txn: ServerTransaction) -> None:
        """Called by the storage state once ``txn`` committed or aborted."""
        if self.txn is txn:
            self.txn = None
        txn.phase = TxnPhase.ENDED

    def statistics(self) -> dict:
        return {
            "label": self.label,
            "peer": self.peer,
            "storage": self.state.storage_id if self.state else None,
            "read_only": self.read_only,
            "protocol": self.conn.protocol.decode() if self.conn.protocol else None,
            "connected_at": self.connected_at,
            "calls": self.calls,
            "in_transaction": self.txn is not None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
