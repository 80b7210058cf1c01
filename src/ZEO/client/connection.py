"""One client connection: a blocking socket, a reader thread, callers that write themselves.

Threading contract (docs/design.rst, "Threading and ordering (client)"):

* A caller encodes its frame and writes it under ``_send_lock``; a two-way call registers a
  :class:`Call` in the pending table first and then waits on it.
* Whoever holds the *read role* (``_role``) decodes incoming frames, in arrival order.  For a
  reply it runs the call's ``on_reply`` hook (cache work, ZODB callbacks) *before* waking the
  waiters; for a server call it calls ``handler.server_call(name, args)``.  So whatever the
  hooks and the handler do happens in exactly the server's order.
* On a plain socket with ``epoll`` (Linux), a caller waiting for its reply takes the read
  role itself when it is free ("leader"): it reads the socket until its reply is dispatched,
  so the reply needs no hand-over from another thread.  Otherwise (the role is busy, TLS, no
  epoll) it waits for the reader thread, which reads whenever no caller does.
* When the connection ends, every pending call fails at once with ``ClientDisconnected`` and
  ``handler.connection_lost(connection)`` runs (once), on the reader thread.

The byte transport is a small object with ``sendall``, ``recv`` and ``close`` so that a TLS
transport (``ssl.MemoryBIO`` pumping) can replace the plain socket later.
"""

from __future__ import annotations

import _thread
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ZEO.Exceptions import ClientDisconnected, ProtocolError
from ZEO.protocol import (
    ClientConnection,
    Greeting,
    ProtocolViolation,
    payload_to_exception,
)
from ZEO.protocol.messages import REPLY

logger = logging.getLogger("ZEO.client")

RECV_SIZE = 1 << 18

#: Callers read their own replies (see the module docstring) where epoll exists.
LEADER_READS = hasattr(select, "epoll")
if LEADER_READS:
    _ARMED = select.EPOLLIN | select.EPOLLONESHOT
    _DISARMED = select.EPOLLONESHOT


_HAS_SENDMSG = hasattr(socket.socket, "sendmsg")
try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16


class Transport(Protocol):
    """The byte stream a :class:`Connection` runs over."""

    def sendall(self, data: bytes) -> None: ...

    def sendall_parts(self, parts: list[bytes]) -> None: ...

    def recv(self, n: int) -> bytes: ...

    def close(self) -> None: ...


class SocketTransport:
    """A plain TCP or Unix socket.  ``recv`` and ``sendall`` may run on two threads at once."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def sendall_parts(self, parts: list[bytes]) -> None:
        """Send ``parts`` in order as one stream, with vectored writes (no joined copy)."""
        if not _HAS_SENDMSG:
            self.sock.sendall(b"".join(parts))
            return
        sock = self.sock
        todo: list = list(parts)
        start = 0
        end = len(todo)
        while start < end:
            if not len(todo[start]):
                start += 1
                continue
            sent = sock.sendmsg(todo[start:start + _IOV_MAX])
            while sent:
                size = len(todo[start])
                if sent >= size:
                    sent -= size
                    start += 1
                else:
                    todo[start] = memoryview(todo[start])[sent:]
                    sent = 0

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def open_transport(addr: Any, timeout: float, ssl_context: Any = None,
                   server_hostname: str | None = None) -> tuple[Transport, Any]:
    """Connect to ``addr``; return ``(transport, peer address)``.  Raises ``OSError``."""
    if isinstance(addr, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        peer = addr
    else:
        sock = socket.create_connection(addr, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = sock.getpeername()[:2]
    if ssl_context is not None:  # TLS: ZEO.client.tls
        from .tls import open_tls_transport

        try:
            return open_tls_transport(sock, peer, ssl_context, server_hostname, timeout), peer
        except BaseException:
            sock.close()
            raise
    sock.settimeout(None)
    return SocketTransport(sock), peer





class Call:
    """One pending two-way call.  Several waiters may share it (request collapsing)."""

    __slots__ = ("msgid", "name", "on_reply", "after_reply", "on_error", "_lock", "_done",
                 "value", "exc", "_lead")

    def __init__(self, msgid: Any, name: str,
                 on_reply: Callable[[Any], Any] | None = None,
                 after_reply: Callable[[Any], None] | None = None,
                 on_error: Callable[[Any, BaseException], None] | None = None,
                 lead: Callable[[Call, float | None], None] | None = None) -> None:
        self.msgid = msgid
        self._lead = lead  # the connection's Connection._lead, or None
        self.name = name
        self.on_reply = on_reply  # reader thread, before the waiters wake
        self.after_reply = after_reply  # reader thread, after they woke (nothing to wait for)
        self.on_error = on_error  # reader thread, with (msgid, exception) of an error reply
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._done = False
        self.value: Any = None
        self.exc: BaseException | None = None

    def _finish(self, value: Any = None, exc: BaseException | None = None) -> None:
        if self._done:
            return
        self.value = value
        self.exc = exc
        self._done = True
        self._lock.release()

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> Any:
        """The reply value; raise the error reply or ``ClientDisconnected``."""
        if not self._done:
            if self._lead is not None:
                deadline = None if timeout is None else time.monotonic() + timeout
                self._lead(self, deadline)
                if deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
        if not self._done:
            if not self._lock.acquire(True, -1 if timeout is None else timeout):
                raise ClientDisconnected(f"timed out waiting for the reply to {self.name}")
            self._lock.release()  # let the other waiters of a collapsed call through
        exc = self.exc
        if exc is not None:
            try:
                raise exc
            finally:
                # The traceback holds this frame: without this, the call, its error and
                # every frame the error passes through (the application's, with its
                # persistent objects) would form a cycle (docs/client.rst, "The collector
                # and the pickle cache").
                del self, exc
        return self.value


class Handler(Protocol):
    """What a :class:`Connection` reports to (the client storage)."""

    def server_call(self, connection: Connection, name: str, args: tuple) -> None: ...

    def connection_lost(self, connection: Connection) -> None: ...


class Connection:
    """A handshaken connection to a ZEO server.  Build it with :meth:`open` (by address) or
    :meth:`over` (over a transport already open)."""

    def __init__(self, transport: Transport, core: ClientConnection, peer: Any,
                 handler: Handler, name: str = "") -> None:
        self.transport = transport
        self.core = core  # the sans-I/O state machine (ZEO.protocol)
        self.peer = peer
        self.handler = handler
        self.protocol_version: bytes = core.protocol or b""
        self._send_lock = threading.Lock()
        # One-way frames held back (under _send_lock) to leave with the next send.
        self._held: list[bytes] = []
        self._held_bytes = 0
        # Never held while doing I/O: the reader takes it, and must never wait for a writer.
        self._pending_lock = threading.Lock()
        # The read role: held by whoever reads the socket and dispatches frames.
        self._role = threading.Lock()
        self._epoll: Any = None
        self._lead_fn: Callable[[Call, float | None], None] | None = None
        if LEADER_READS and type(transport) is SocketTransport:
            self._sock = transport.sock
            self._fd = self._sock.fileno()
            self._epoll = select.epoll()
            self._epoll.register(self._fd, _ARMED)
            self._poller = select.poll()  # a leader's wait with a deadline (under _role)
            self._poller.register(self._fd, select.POLLIN)
            self._lead_fn = self._lead
        self._pending: dict[Any, Call] = {}
        self._msgids = itertools.count(1)
        # Waits for a reply that read the socket themselves / found another thread reading
        # (not locked: statistics, a lost increment is possible).
        self.waits_led = 0
        self.waits_handed = 0
        self.closed = False
        self._lost_reported = False
        self._backlog: list = []
        self._reader = threading.Thread(
            target=self._reader_main, name=f"{name} zeo client reader", daemon=True)

    @classmethod
    def open(cls, addr: Any, handler: Handler, *, timeout: float = 10.0, name: str = "",
             ssl_context: Any = None, server_hostname: str | None = None,
             max_message_size: int | None = None) -> Connection:
        """Connect to ``addr`` and do the handshake; the reader thread is running on return."""
        transport, peer = open_transport(addr, timeout, ssl_context, server_hostname)
        return cls.over(transport, peer, handler, timeout=timeout, name=name,
                        tls=ssl_context is not None, max_message_size=max_message_size)

    @classmethod
    def over(cls, transport: Transport, peer: Any, handler: Handler, *,
             timeout: float = 10.0, name: str = "", tls: bool = False,
             max_message_size: int | None = None) -> Connection:
        """Do the handshake over an open ``transport`` (closed on failure); the reader
        thread is running on return.  ``tls`` says the transport is TLS (a silent server
        is then not a hint to use TLS)."""
        try:
            core = (ClientConnection(max_message_size) if max_message_size
                    else ClientConnection())
            backlog: list = []
            greeted = False
            if isinstance(transport, SocketTransport):
                transport.sock.settimeout(timeout)
            while not greeted:
                try:
                    data = transport.recv(RECV_SIZE)
                except TimeoutError:
                    if not tls:  # a TLS server waits for our ClientHello
                        from .tls import TLSError

                        raise TLSError(
                            f"{peer!r} sent no ZEO greeting within {timeout} s: if it is "
                            "a TLS server, connect with ssl=") from None
                    raise
                if not data:
                    raise ConnectionError(f"{peer!r} closed the connection before the greeting")
                for event in core.receive_data(data):
                    if isinstance(event, Greeting):
                        greeted = True
                    else:
                        backlog.append(event)
            if isinstance(transport, SocketTransport):
                transport.sock.settimeout(None)
            assert core.handshake_reply is not None
            transport.sendall(core.handshake_reply)
        except ProtocolViolation as e:
            transport.close()
            raise ProtocolError(str(e)) from e
        except BaseException:
            transport.close()
            raise
        conn = cls(transport, core, peer, handler, name)
        conn._backlog = backlog
        conn._reader.start()
        return conn

    # -- sending -----------------------------------------------------------------------------

    def call(self, name: str, *args: Any, on_reply: Callable[[Any], Any] | None = None,
             msgid: Any = None, after_reply: Callable[[Any], None] | None = None) -> Call:
        """Send a two-way call and return its :class:`Call` (not waited for).

        With an explicit ``msgid`` (``loadBefore``'s ``(oid, tid)``), an identical call still
        pending is shared instead of sent again.
        """
        with self._send_lock:
            if self.closed:
                raise ClientDisconnected(f"connection to {self.peer!r} is closed")
            if msgid is None:
                msgid = next(self._msgids)
            with self._pending_lock:
                if self.closed:
                    raise ClientDisconnected(f"connection to {self.peer!r} is closed")
                existing = self._pending.get(msgid)
                if existing is not None:
                    return existing
                call = Call(msgid, name, on_reply, after_reply, None, self._lead_fn)
                self._pending[msgid] = call
            try:
                self._send_locked(self.core.send_call(msgid, name, args))
            except OSError as e:
                with self._pending_lock:
                    self._pending.pop(msgid, None)
                raise ClientDisconnected(f"{name}: {e}") from e
        return call

    def _send_locked(self, data: bytes) -> None:
        """Send ``data`` after any held one-way frames; ``_send_lock`` must be held."""
        held = self._held
        if held:
            held.append(data)
            parts = held[:]
            held.clear()
            self._held_bytes = 0
            self.transport.sendall_parts(parts)
        else:
            self.transport.sendall(data)

    def call_many(self, name: str, calls: list[tuple[Any, tuple, Callable[[Any], Any]]],
                  on_error: Callable[[Any, BaseException], None] | None = None) -> None:
        """Send several two-way calls ``(msgid, args, on_reply)`` in one write, not waited for.

        A msgid already pending is skipped (its reply serves both).  ``on_error(msgid, exc)``
        hears of error replies (on the reader thread).
        """
        with self._send_lock:
            if self.closed:
                raise ClientDisconnected(f"connection to {self.peer!r} is closed")
            frames = []
            with self._pending_lock:
                for msgid, args, on_reply in calls:
                    if msgid in self._pending:
                        continue
                    self._pending[msgid] = Call(msgid, name, on_reply, None, on_error,
                                                self._lead_fn)
                    frames.append(self.core.send_call(msgid, name, args))
            if not frames:
                return
            try:
                self._send_locked(b"".join(frames))
            except OSError as e:
                raise ClientDisconnected(f"{name}: {e}") from e

    def pending(self, msgid: Any) -> Call | None:
        """The pending call with ``msgid``, if any."""
        with self._pending_lock:
            return self._pending.get(msgid)

    def call_sync(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        """Call and wait; past ``timeout`` seconds, ClientDisconnected names call and server.

        The connection stays usable: a late reply is dropped with a warning.
        """
        call = self.call(name, *args)
        try:
            return call.wait(timeout)
        except ClientDisconnected:
            if call.done():
                raise
            with self._pending_lock:
                self._pending.pop(call.msgid, None)
            raise ClientDisconnected(
                f"no reply to {name} from {self.peer!r} within {timeout} s") from None
        finally:
            del call  # no cycle through an error's traceback (see Call.wait)

    #: Seconds the reader thread waits in epoll before looking at ``closed`` again (a close
    #: wakes it; this only bounds a close that raced a leader's re-arm).
    IDLE_POLL = 1.0

    #: Held one-way frames are sent at once beyond this many bytes.
    HOLD_LIMIT = 256 * 1024

    def call_oneway(self, name: str, *args: Any, hold: bool = False) -> None:
        """Send a one-way call.

        With ``hold``, the frame may wait (up to :attr:`HOLD_LIMIT` bytes) and leave in the
        same write as the next send on this connection, in order: a transaction's
        ``tpc_begin`` and stores then travel with its ``vote``, one syscall instead of many.
        """
        frame = self.core.send_call(0, name, args, oneway=True)
        with self._send_lock:
            if self.closed:
                raise ClientDisconnected(f"connection to {self.peer!r} is closed")
            if hold:
                self._held.append(frame)
                self._held_bytes += len(frame)
                if self._held_bytes < self.HOLD_LIMIT:
                    return
                frame = b""
            try:
                self._send_locked(frame)
            except OSError as e:
                raise ClientDisconnected(f"{name}: {e}") from e

    def heartbeat(self) -> None:
        frame = self.core.send_heartbeat()
        with self._send_lock:
            if self.closed:
                return
            try:
                self._send_locked(frame)
            except OSError:
                pass  # the reader notices the dead socket

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and fail every pending call; the reader thread then ends."""
        if self._epoll is not None and self._reader.is_alive():
            # Only shut it down: the reader closes it.  A file closed under its epoll wait
            # vanishes from it without waking it, so it would sleep out its poll timeout.
            self._shut_down()
            return
        self._mark_closed()
        self.transport.close()

    def _mark_closed(self) -> list[Call]:
        with self._pending_lock:
            self.closed = True
            pending = list(self._pending.values())
            self._pending.clear()
        for call in pending:
            call._finish(exc=ClientDisconnected(f"connection to {self.peer!r} lost"))
        return pending

    def statistics(self) -> dict[str, Any]:
        """``leader_reads`` (callers may read their own replies here), ``waits_led`` (waits
        that did) and ``waits_handed`` (waits that found another thread reading)."""
        return {"leader_reads": self._epoll is not None, "waits_led": self.waits_led,
                "waits_handed": self.waits_handed}

    def join(self, timeout: float | None = None) -> None:
        if self._reader is not threading.current_thread() and self._reader.is_alive():
            self._reader.join(timeout)

    # -- reading (reader thread) ------------------------------------------------------------

    def _reader_main(self) -> None:
        """The reader thread: read until the connection ends, then report the loss once."""
        try:
            if self._epoll is not None:
                self._poll_frames()
            else:
                self._read_frames()
        except Exception as e:
            self._log_read_failure(e)
        finally:
            self._reader_done()
            if self._epoll is not None:
                self._epoll.close()

    def _log_read_failure(self, e: Exception) -> None:
        """Log why reading ended (in the ``except`` block that caught ``e``)."""
        if isinstance(e, ProtocolViolation):
            logger.error("protocol error from %r, closing: %s", self.peer, e)
        elif isinstance(e, OSError):
            if not self.closed:
                logger.info("connection to %r lost: %s", self.peer, e)
        else:
            logger.exception("client reader for %r failed", self.peer)

    def _read_frames(self) -> None:
        """Read with a blocking ``recv``: callers never lead (TLS, no epoll)."""
        for msg in self._backlog:
            self._dispatch(msg)
        self._backlog = []
        recv = self.transport.recv
        receive = self.core.receive_data
        while not self.closed:
            data = recv(RECV_SIZE)
            if not data:
                return
            for msg in receive(data):
                self._dispatch(msg)

    def _reader_done(self) -> None:
        self._mark_closed()
        try:
            self.transport.close()
        except OSError:
            pass
        if not self._lost_reported:
            self._lost_reported = True
            try:
                self.handler.connection_lost(self)
            except Exception:
                logger.exception("connection_lost handler failed")

    def _poll_frames(self) -> None:
        """Read only while no caller leads.

        The socket is registered one-shot: an event disarms it, and whoever holds the read
        role re-arms it when done, so a leading caller's reply does not wake this thread too.
        """
        epoll = self._epoll
        sock = self._sock
        with self._role:
            for msg in self._backlog:
                self._dispatch(msg)
            self._backlog = []
        receive = self.core.receive_data
        while not self.closed:
            if not epoll.poll(self.IDLE_POLL):
                continue  # (a close that raced a leader's re-arm is noticed here)
            with self._role:
                if self.closed:
                    return
                try:
                    data = sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    data = None  # a leader read it first
                if data is not None:
                    if not data:
                        return
                    for msg in receive(data):
                        self._dispatch(msg)
                epoll.modify(self._fd, _ARMED)

    def _lead(self, call: Call, deadline: float | None) -> None:
        """Caller thread: read and dispatch until ``call`` is done, if the read role is free.

        Returns early (``call`` not done) when another thread reads, at ``deadline``, or when
        the connection ends; the caller then waits on the call as usual.
        """
        if not self._role.acquire(False):
            self.waits_handed += 1
            return
        try:
            if call._done or self.closed:
                return
            self.waits_led += 1
            fd = self._fd
            epoll = self._epoll
            try:
                epoll.modify(fd, _DISARMED)
            except (OSError, ValueError):
                return  # the reader closed it just now: the connection is ending
            try:
                self._lead_until(call, deadline)
            finally:
                try:
                    epoll.modify(fd, _ARMED)
                except (OSError, ValueError):
                    pass  # closed meanwhile; the reader thread ends on its own
        finally:
            self._role.release()

    def _lead_until(self, call: Call, deadline: float | None) -> None:
        sock = self._sock
        receive = self.core.receive_data
        try:
            while not call._done:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._poller.poll(remaining * 1000):
                        return
                data = sock.recv(RECV_SIZE)
                if not data:
                    self._shut_down()
                    return
                for msg in receive(data):
                    self._dispatch(msg)
        except Exception as e:
            self._log_read_failure(e)
            self._shut_down()
        except BaseException:
            self._shut_down()  # frames may be half dispatched (an interrupt): this stream is done
            raise

    def _shut_down(self) -> None:
        """Fail the pending calls and shut the socket down; the reader closes it and reports
        the loss."""
        self._mark_closed()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(self, msg: tuple) -> None:
        msgid, flags, name, args = msg
        if name == REPLY:
            with self._pending_lock:
                call = self._pending.pop(msgid, None)
            if call is None:
                logger.warning("reply to unknown msgid %r from %r", msgid, self.peer)
                return
            if flags:
                try:
                    exc = payload_to_exception(*args)
                except Exception as e:  # malformed error payload: still fail the call
                    exc = e
                call._finish(exc=exc)
                if call.on_error is not None:
                    try:
                        call.on_error(msgid, exc)
                    except Exception:
                        logger.exception("error hook of %s failed", call.name)
                return
            value = args
            if call.on_reply is not None:
                try:
                    value = call.on_reply(args)
                except BaseException as e:
                    call._finish(exc=e)
                    del call  # its traceback holds this frame (see Call.wait)
                    return
            call._finish(value)
            if call.after_reply is not None:
                try:
                    call.after_reply(value)
                except Exception:
                    logger.exception("after-reply hook of %s failed", call.name)
            return
        if not flags:
            raise ProtocolError(f"server sent a two-way call {name!r}")
        try:
            self.handler.server_call(self, name, args)
        except Exception:
            logger.exception("handling server call %r failed", name)
