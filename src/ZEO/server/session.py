"""One client connection to the server: a thin asyncio Protocol over the sans-I/O core.

A :class:`Session` owns the transport: it feeds received bytes to its
:class:`~ZEO.protocol.ServerConnection`, dispatches each decoded call to its
:class:`~ZEO.server.zeostorage.ZEOStorage` (the ZEO API), and writes the replies, batched
per received chunk, with back-pressure both ways (reading pauses while too many calls are
in flight or the client does not read).  Errors in one session never reach another.
"""

from __future__ import annotations

import asyncio
import logging
import socket
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
from .commit import OnewaysThenReply
from .zeostorage import LATER, REGISTERED_METHODS, ZEOStorage

if TYPE_CHECKING:
    from .storage_server import StorageServer, StorageState

logger = logging.getLogger("ZEO.StorageServer")

#: Largest frame before registration (the handshake, then a ``register`` call that names a
#: storage): a peer that has not registered cannot make us buffer more than this.
REGISTER_MAX_MESSAGE = 64 * 1024
#: Replies batched while handling one received chunk are written once they reach this size,
#: so a client that does not read is noticed (pause_writing) before a large backlog builds.
BATCH_BYTES = 256 * 1024
#: An error reply larger than this is replaced by a short one (its text came from the peer).
MAX_ERROR_REPLY = 16 * 1024
# Exceptions that are part of normal operation: never logged as errors.
_QUIET = (POSKeyError, ConflictError, ReadConflictError)


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
        self.state: StorageState | None = None  # the registered storage's, once registered
        self.closed = False
        self._batch: list[bytes] | None = None
        self._batch_bytes = 0
        self._current: tuple = (None, 0, "", ())  # the message being dispatched
        self.api = ZEOStorage(self)
        self._methods: dict[str, Callable] = {"register": self.api.register}
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
        self.api.connection_lost()
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

    def registered(self, state: StorageState) -> None:
        """The API registered on ``state``: answer every ZEO method from now on."""
        self.state = state
        self.core.set_receive_limit(self.server.max_message_size)
        api = self.api
        self._methods = {name: getattr(api, name) for name in REGISTERED_METHODS}
        state.sessions[self] = None
        if self._register_timer is not None:
            self._register_timer.cancel()
            self._register_timer = None

    def set_label(self, client_label: str) -> None:
        """Name this connection ``client_label`` (printable, short) in logs and tools."""
        self.client_label = client_label
        self.label = f"{client_label} {self.peer}"

    async def writable(self) -> None:
        """Return once the client reads again (at once when it does)."""
        if not self._writable.is_set():
            await self._writable.wait()

    def statistics(self) -> dict:
        """What the admin socket's ``clients`` command shows of this connection."""
        return {
            "label": self.label,
            "client_label": self.client_label,
            "peer": self.peer,
            "storage": self.state.storage_id if self.state else None,
            "read_only": self.api.read_only,
            "protocol": self.core.protocol.decode() if self.core.protocol else None,
            "connected_at": self.connected_at,
            "calls": self.calls,
            "in_transaction": self.api.txn is not None,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

