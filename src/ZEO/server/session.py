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

from ..protocol import (
    Handshake,
    RemoteProtocolError,
    RuokRequest,
    ServerConnection,
    UndecodableCall,
)
from ..protocol.errors import LocalProtocolError, peer_repr
from .commit import (
    CHECK,
    DELETE,
    RECORD_OVERHEAD,
    RESTORE,
    STORE,
    UNDO,
    OnewaysThenReply,
    ServerTransaction,
    TxnPhase,
)

if TYPE_CHECKING:
    from .storage_server import StorageServer, StorageState

logger = logging.getLogger("ZEO.StorageServer")

BLOB_CHUNK_SIZE = 59000
#: Largest frame before registration (the handshake, then a ``register`` call that names a
#: storage): a peer that has not registered cannot make us buffer more than this.
REGISTER_MAX_MESSAGE = 64 * 1024
#: Replies batched while handling one received chunk are written once they reach this size,
#: so a client that does not read is noticed (pause_writing) before a large backlog builds.
BATCH_BYTES = 256 * 1024
#: Longest client label and storage name kept or logged.
MAX_LABEL = 256
#: An error reply larger than this is replaced by a short one (its text came from the peer).
MAX_ERROR_REPLY = 16 * 1024
#: Highest oid a client may write: the oid counter must stay usable after it (``\xff`` * 8
#: would make every later ``new_oid`` fail, in every client, across restarts).
MAX_OID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
#: Transaction statuses a storage understands (restores copy them from another storage).
_STATUSES = (" ", "p", "u", "c")
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


class PendingReply:
    """The reply to a call that completes later on the loop thread (vote, tpc_finish).

    It is written the moment it is settled, in the same loop turn: an asyncio future would
    hand it to its done callbacks one turn later, and on the commit path every turn is time
    the commit lock is held.
    """

    __slots__ = ("session", "msgid", "oneway", "name", "settled")

    def __init__(self, session: Session, msgid: Any, oneway: bool, name: str) -> None:
        self.session = session
        self.msgid = msgid
        self.oneway = oneway
        self.name = name
        self.settled = False
        session.call_started()

    def _settle(self) -> None:
        if not self.settled:
            self.settled = True
            self.session.call_ended()

    def resolve(self, value: Any) -> None:
        self._settle()
        session = self.session
        if session.closed or self.oneway:
            return
        if type(value) is OnewaysThenReply:
            conn = session.core
            session.write_all([conn.send_oneway(n, a) for n, a in value.oneways]
                              + [conn.send_reply(self.msgid, value.value)])
        else:
            session._reply(self.msgid, value)

    def fail(self, exc: BaseException) -> None:
        self._settle()
        if not self.session.closed:
            self.session._call_failed(self.msgid, self.oneway, self.name, exc)


LATER = object()  # a method's result: its PendingReply will answer


class Session(asyncio.Protocol):
    """The server side of one client connection."""

    def __init__(self, server: StorageServer) -> None:
        self.server = server
        self.loop = server.event_loop
        self.transport: asyncio.Transport | None = None
        self.core = ServerConnection(server.announce, server.max_message_size)
        self.peer = "?"
        self.label = "?"
        self.client_label: str | None = None  # as the client set it (set_client_label)
        self.state: StorageState | None = None
        self.storage: Any = None
        self.read_only = False
        self.authorized_read_only = False  # ZEO.server.auth: the certificate may only read
        self.txn: ServerTransaction | None = None
        self.closed = False
        self._batch: list[bytes] | None = None
        self._batch_bytes = 0
        self._current: tuple = (None, 0, "", ())  # the message being dispatched
        self._methods: dict[str, Callable] = {"register": self.register}
        self._iterators: dict[int, Any] = {}
        self._iterator_last: dict[int, Any] = {}
        self._next_iterator_id = 0
        self._blob_upload: tuple[Any, str] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._register_timer: asyncio.TimerHandle | None = None
        self._in_flight = 0  # calls answered later (thread pool, commit worker, blob sends)
        self._held_events: Any = None  # the rest of a chunk, while reading is paused
        self._reading_paused = False
        self._buffered = 0  # bytes of partial frames, counted in the server's budget
        self.held_memory = False  # it once held a large partial frame or backlog
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
        self.core.set_receive_limit(REGISTER_MAX_MESSAGE)
        if server.register_timeout:
            self._register_timer = self.loop.call_later(server.register_timeout,
                                                        self._not_registered)
        transport.write(self.core.greeting())  # type: ignore[attr-defined]

    def _not_registered(self) -> None:
        if self.state is None and not self.closed:
            logger.warning("(%s) did not register within %s seconds, closing", self.label,
                           self.server.register_timeout)
            self.close()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            events = self.core.receive_data(data)
        except RemoteProtocolError as e:
            self._protocol_error(e)
            return
        self._handle_events(events)
        self._account_buffered()

    def _handle_events(self, events: Any) -> None:
        """Handle the events of one received chunk; when too many calls are in flight or
        the client does not read our replies, pause reading and keep the rest for
        :meth:`_resume`."""
        # Replies produced while handling this chunk leave in one write at the end.
        self._batch = batch = []
        limit = self.server.max_calls_in_flight
        try:
            for event in events:
                if type(event) is tuple:
                    self._handle_call(event)
                elif isinstance(event, UndecodableCall):
                    self._undecodable(event)
                elif isinstance(event, Handshake):
                    logger.debug("(%s) handshake %r", self.label, event.protocol)
                elif isinstance(event, RuokRequest):
                    batch.append(self.core.send_status(self.server.ruok()))
                    self._flush(batch)
                    self.close()
                    return
                if self.closed:
                    break
                if self._in_flight >= limit or not self._writable.is_set():
                    self._held_events = events
                    self._pause_reading()
                    break
        except RemoteProtocolError as e:
            self._flush(batch)
            self._protocol_error(e)
            return
        finally:
            self._batch = None
        self._flush(batch)

    def _protocol_error(self, e: RemoteProtocolError) -> None:
        logger.error("(%s) protocol error, closing: %s", self.label, e)
        self.close()

    def _undecodable(self, event: UndecodableCall) -> None:
        logger.warning("(%s) undecodable call %s: %s", self.label, peer_repr(event.msgid),
                       event.error)
        self.write(self.core.send_error(event.msgid,
                                        ValueError(f"undecodable request: {event.error}")))

    def _account_buffered(self) -> None:
        """Keep the server's count of partial-frame bytes; over its budget, close the
        connection that holds a large share."""
        now = self.core.buffered
        delta = now - self._buffered
        if delta:
            self._buffered = now
            if now > 1 << 20:
                self.held_memory = True
            server = self.server
            server.buffered_input += delta
            if (delta > 0 and server.buffered_input > server.max_buffered
                    and now >= server.max_buffered // 64):
                logger.warning("(%s) server-wide buffer budget (%d bytes) exhausted: "
                               "closing this connection, which holds %d bytes of a partial "
                               "message", self.label, server.max_buffered, now)
                self.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _can_go_on(self) -> bool:
        return (not self.closed and self._writable.is_set()
                and self._in_flight < self.server.max_calls_in_flight)

    def _resume(self) -> None:
        """Handle what :meth:`_handle_events` held back and read again, once the calls in
        flight and the client's reading allow it."""
        if not self._reading_paused or not self._can_go_on():
            return
        events, self._held_events = self._held_events, None
        if events is not None:
            self._handle_events(events)  # may hold back again
        if self._held_events is None and self._can_go_on() and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def call_started(self) -> None:
        self._in_flight += 1

    def call_ended(self) -> None:
        """A call answered later is done."""
        self._in_flight -= 1
        if self._reading_paused:
            self._resume()

    def _flush(self, batch: list[bytes]) -> None:
        if batch and self.transport is not None and not self.transport.is_closing():
            if len(batch) == 1:
                self.bytes_out += len(batch[0])
                self.transport.write(batch[0])
            else:
                self.bytes_out += sum(map(len, batch))
                self.transport.writelines(batch)
            self._check_output()
        batch.clear()
        self._batch_bytes = 0

    def write(self, frame: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(frame)
            self._batch_bytes += len(frame)
            if self._batch_bytes > BATCH_BYTES:  # let the transport tell us to stop
                self._flush(batch)
        elif self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(frame)
            self.transport.write(frame)
            if not self._writable.is_set():
                self._check_output()

    def write_all(self, frames: list[bytes]) -> None:
        """Write ``frames`` together (one write when no batch is open)."""
        batch = self._batch
        if batch is not None:
            batch.extend(frames)
            self._batch_bytes += sum(map(len, frames))
            if self._batch_bytes > BATCH_BYTES:
                self._flush(batch)
        else:
            self._flush(frames)

    def reply_later(self) -> PendingReply:
        """The :class:`PendingReply` of the call being dispatched; the method returns LATER."""
        msgid, flags, name, _args = self._current
        return PendingReply(self, msgid, bool(flags), name)

    def _check_output(self) -> None:
        """Drop a client that does not read what we send (e.g. invalidations) once its
        backlog passes ``max_output_buffer``, or the backlogs of all such clients together
        pass the server's ``max_buffered``, rather than let them grow without bound."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        size = transport.get_write_buffer_size()
        server = self.server
        if size > server.max_output_buffer:
            why = f"more than {server.max_output_buffer} bytes wait to be sent"
        elif self._writable.is_set():
            return
        elif server.unsent_output() > server.max_buffered:
            why = (f"clients that do not read hold more than {server.max_buffered} bytes "
                   f"(this one {size})")
        else:
            return
        logger.warning("(%s) %s: the client is not reading, closing", self.label, why)
        transport.abort()
        self.closed = True

    def pause_writing(self) -> None:
        # A client that does not read what we send is not read either: its requests would
        # only add to the backlog.
        self._writable.clear()
        self.held_memory = True
        self.server.slow_readers[self] = None
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        self.server.slow_readers.pop(self, None)
        self._resume()

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
            self.state.commits.abort(self, txn, None)  # type: ignore[union-attr]
        self._close_blob_upload()
        self.server.open_iterators -= len(self._iterators)
        self._iterators.clear()
        self._iterator_last.clear()
        self._held_events = None
        self._methods = {}  # bound methods: a cycle that would keep this session for the GC
        self.core.discard_buffered()
        self.server.slow_readers.pop(self, None)
        self.server.buffered_input -= self._buffered
        self._buffered = 0
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
            logger.error("(%s) invalid method %s, closing", self.label, peer_repr(name, 60))
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
            self.call_started()
            if flags:
                result.add_done_callback(lambda fut: self._deferred_oneway(name, fut))
            else:
                result.add_done_callback(lambda fut: self._deferred_reply(msgid, name, fut))
            # After the reply callback: the calls held back are handled once it is written.
            result.add_done_callback(self._future_done)
        elif not flags:
            self._reply(msgid, result)

    def _future_done(self, fut: asyncio.Future) -> None:
        self.call_ended()

    def _reply(self, msgid: Any, result: Any) -> None:
        try:
            self.write(self.core.send_reply(msgid, result))
        except LocalProtocolError as e:
            logger.error("(%s) reply too large: %s", self.label, e)
            self.write(self.core.send_error(msgid, ValueError(str(e))))

    def _call_failed(self, msgid: Any, oneway: Any, name: str, exc: BaseException) -> None:
        """A call raised ``exc``: a one-way call closes the connection (its client would
        never hear of the failure), a two-way call gets an error reply."""
        if oneway:
            logger.error("(%s) one-way call %r failed, closing: %s", self.label, name,
                         peer_repr(exc))
            self.close()
            return
        self._log_failure(name, exc)
        frame = self.core.send_error(msgid, exc)
        if len(frame) > MAX_ERROR_REPLY:  # its text holds what the peer sent: cut it
            frame = self.core.send_error(msgid, ValueError(peer_repr(exc)))
        self.write(frame)

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
        expected = isinstance(exc, (ReadOnlyError, StorageTransactionError, ValueError,
                                    KeyError))
        text = peer_repr(exc)
        # A traceback repeats the exception's text in full: only for short ones.
        logger.error("(%s) %r raised exception: %s", self.label, name, text,
                     exc_info=None if expected or text.endswith("characters)") else exc)

    def send_oneway(self, name: str, args: tuple) -> None:
        if not self.closed:
            self.write(self.core.send_oneway(name, args))

    # -- registration ----------------------------------------------------------------

    def register(self, storage_id: str, read_only: Any) -> bytes:
        if type(storage_id) is not str or len(storage_id) > MAX_LABEL:
            raise ValueError(f"unknown storage: {peer_repr(storage_id, 60)}")
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
        self.core.set_receive_limit(self.server.max_message_size)
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
        if type(label) is not str:
            logger.warning("(%s) set_client_label with a %s: ignored", self.label,
                           type(label).__name__)
            return
        # Logged on every line of this connection: printable, and short.
        label = "".join(c if c.isprintable() else "?" for c in label[:MAX_LABEL])
        self.client_label = label
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
        if state.commits.finishing:  # the storage may block readers during a finish
            state.commits.load_behind_finish(oid, tid, self.reply_later())
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

    def iterator_start(self, start: Any = None, stop: Any = None) -> int:
        _check_tid_arg(start)
        _check_tid_arg(stop)
        self._check_iterator_room()
        return self._add_iterator(iter(self.storage.iterator(start, stop)))

    def iterator_next(self, iid: int) -> Any:
        it = self._iterators.get(iid) if type(iid) is int else None
        if it is None:
            raise KeyError(iid if type(iid) is int else peer_repr(iid, 40))
        try:
            txn = next(it)
        except StopIteration:
            self._drop_iterator(iid)
            return None
        self._iterator_last[iid] = txn
        return (txn.tid, txn.status, txn.user, txn.description, txn.extension)

    def iterator_record_start(self, txn_iid: int, tid: bytes) -> int:
        txn = self._iterator_last.get(txn_iid) if type(txn_iid) is int else None
        if txn is None or txn.tid != tid:
            raise Exception(f"Out-of-order request for records of {peer_repr(tid, 40)}")
        return self._add_iterator(iter(txn))

    def iterator_record_next(self, riid: int) -> Any:
        it = self._iterators.get(riid) if type(riid) is int else None
        if it is None:
            raise KeyError(riid if type(riid) is int else peer_repr(riid, 40))
        try:
            rec = next(it)
        except StopIteration:
            self._drop_iterator(riid)
            return None
        return (rec.oid, rec.tid, rec.data, rec.data_txn)

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
            if tid <= self.state.published_tid:  # type: ignore[union-attr]
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
        self.state.stats_active_txns += 1  # type: ignore[union-attr]

    def storea(self, oid: bytes, serial: bytes, data: bytes, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        data = _record_data(data)
        self.state.stats_stores += 1  # type: ignore[union-attr]
        self._buffer(txn, (STORE, oid, serial, data), len(data) if data else 0)

    def checkCurrentSerialInTransaction(self, oid: bytes, serial: bytes, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        self._buffer(txn, (CHECK, oid, serial), 0)

    def restorea(self, oid: bytes, serial: bytes, data: Any, prev_txn: Any, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        data = _record_data(data)
        if prev_txn is not None:
            _check_tid_arg(prev_txn)
        self.state.stats_stores += 1  # type: ignore[union-attr]
        self._buffer(txn, (RESTORE, oid, serial, data, prev_txn), len(data) if data else 0)

    def deleteObject(self, oid: bytes, serial: bytes, txn_id: Any) -> None:
        txn = self._writable_txn(txn_id, oid, serial)
        self.state.stats_stores += 1  # type: ignore[union-attr]
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

    def storeBlobEnd(self, oid: bytes, serial: bytes, data: bytes, txn_id: Any) -> None:
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
        self.state.commits.vote(self, txn, self.reply_later())
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
        self.state.commits.finish(self, txn, self.reply_later())
        return LATER

    def tpc_abort(self, txn_id: Any) -> Any:
        txn = self.txn
        if txn is None or txn.txn_id != txn_id:
            return None
        assert self.state is not None
        self.state.commits.abort(self, txn, self.reply_later())
        return LATER

    def transaction_ended(self, txn: ServerTransaction) -> None:
        """Called by the storage state once ``txn`` committed or aborted."""
        if self.txn is txn:
            self.txn = None
        txn.move_to(TxnPhase.ENDED)

    def statistics(self) -> dict:
        return {
            "label": self.label,
            "client_label": self.client_label,
            "peer": self.peer,
            "storage": self.state.storage_id if self.state else None,
            "read_only": self.read_only,
            "protocol": self.core.protocol.decode() if self.core.protocol else None,
            "connected_at": self.connected_at,
            "calls": self.calls,
            "in_transaction": self.txn is not None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


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
