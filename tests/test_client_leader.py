"""Client connection read role: a waiting caller reads its own reply, the reader thread the rest.

A scripted server (the sans-I/O ``ServerConnection`` on one end of a real socket pair) answers
the client's :class:`ZEO.client.connection.Connection`; handlers record on which thread and
in which order every frame was dispatched.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from ZEO.client import connection as client_connection
from ZEO.client.connection import Connection, SocketTransport
from ZEO.Exceptions import ClientDisconnected
from ZEO.protocol import ServerConnection

pytestmark = pytest.mark.timeout(60)


class Recorder:
    """The client's handler: records server calls and the loss, with their thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, str]] = []
        self.lost = threading.Event()
        self.lost_count = 0

    def server_call(self, conn: Connection, name: str, args: tuple) -> None:
        self.events.append((name, args, threading.current_thread().name))

    def connection_lost(self, conn: Connection) -> None:
        self.lost_count += 1
        self.events.append(("lost", None, threading.current_thread().name))
        self.lost.set()


class ScriptedServer:
    """Answers each call with ``script(name, args)``: a list of frames to send (or none)."""

    def __init__(self, sock: socket.socket, script) -> None:
        self.sock = sock
        self.proto = ServerConnection(b"Z5")
        self.script = script
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sock.sendall(self.proto.greeting())
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                for event in self.proto.receive_data(data):
                    if not isinstance(event, tuple):
                        continue  # the handshake
                    msgid, _flags, name, args = event
                    for frame in self.script(self, msgid, name, args):
                        self.sock.sendall(frame)
        except OSError:
            return


def open_pair(script, handler: Recorder) -> tuple[Connection, ScriptedServer]:
    a, b = socket.socketpair()
    server = ScriptedServer(b, script)
    conn = Connection.over(SocketTransport(a), "pair", handler, name="test")
    return conn, server


def echo(server: ScriptedServer, msgid, name, args):
    if name == "echo":
        return [server.proto.send_reply(msgid, args)]
    if name == "invalidate_then_echo":
        time.sleep(0.05)  # the caller is waiting (leading) by now
        return [server.proto.send_oneway("invalidateTransaction", (b"t", [b"o"])),
                server.proto.send_reply(msgid, args)]
    if name == "silent":
        return []
    if name == "close":
        server.sock.shutdown(socket.SHUT_RDWR)
        return []
    raise AssertionError(name)


@pytest.fixture
def pair():
    made = []

    def make(script=echo):
        handler = Recorder()
        conn, server = open_pair(script, handler)
        made.append((conn, server))
        return conn, handler

    yield make
    for conn, server in made:
        conn.close()
        conn.join(5)
        server.sock.close()


needs_leader = pytest.mark.skipif(
    not client_connection.LEADER_READS, reason="callers lead only where select.epoll exists")


@needs_leader
def test_caller_dispatches_its_reply_and_what_came_before_it(pair):
    conn, handler = pair()
    me = threading.current_thread().name
    seen = []

    def on_reply(value):
        seen.append((value, threading.current_thread().name))
        return value

    call = conn.call("invalidate_then_echo", 1, on_reply=on_reply)
    assert call.wait(10) == (1,)
    # The invalidation sent before the reply was dispatched first, by the same (caller) thread.
    assert handler.events == [("invalidateTransaction", (b"t", [b"o"]), me)]
    assert seen == [((1,), me)]
    assert conn.statistics() == {"leader_reads": True, "waits_led": 1, "waits_handed": 0}


def test_reader_thread_dispatches_when_nobody_waits(pair):
    conn, handler = pair()
    seen = []
    call = conn.call("invalidate_then_echo", 2,
                     on_reply=lambda v: seen.append(threading.current_thread().name))
    deadline = time.monotonic() + 10
    while not call.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert call.done()
    reader = conn._reader.name
    assert handler.events == [("invalidateTransaction", (b"t", [b"o"]), reader)]
    assert seen == [reader]
    # And the reader keeps reading after a caller led.
    assert conn.call("echo", 3).wait(10) == (3,)
    call = conn.call("invalidate_then_echo", 4)
    deadline = time.monotonic() + 10
    while not call.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert call.wait(0) == (4,)


def test_timeout_while_leading_keeps_the_connection(pair, caplog):
    conn, _ = pair()
    with pytest.raises(ClientDisconnected, match="no reply to silent"):
        conn.call_sync("silent", timeout=0.2)
    assert not conn.closed
    assert conn.call_sync("echo", 5, timeout=10) == (5,)


def test_server_closing_while_a_caller_leads_fails_the_call_and_reports_once(pair):
    conn, handler = pair()
    with pytest.raises(ClientDisconnected):
        conn.call("close").wait(10)
    assert handler.lost.wait(10)
    time.sleep(0.1)
    assert handler.lost_count == 1
    assert handler.events[-1][2] == conn._reader.name  # connection_lost: on the reader thread
    with pytest.raises(ClientDisconnected):
        conn.call("echo", 1)


def test_many_threads_calling_at_once_each_get_their_reply(pair):
    conn, _ = pair()
    errors = []

    def worker(k: int) -> None:
        try:
            for i in range(300):
                assert conn.call("echo", k, i).wait(10) == (k, i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert not conn.closed
    stats = conn.statistics()
    if stats["leader_reads"]:  # every wait either led or found another thread reading
        assert stats["waits_led"] > 0
        assert stats["waits_led"] + stats["waits_handed"] <= 4 * 300


def test_close_from_another_thread_wakes_a_leading_caller(pair):
    conn, handler = pair()
    call = conn.call("silent")
    threading.Timer(0.2, conn.close).start()
    with pytest.raises(ClientDisconnected):
        call.wait(10)
    assert handler.lost.wait(10)


def test_close_wakes_the_reader_thread(pair, monkeypatch):
    # With the reader's idle epoll wait made far longer than the join, only a wake by
    # close() can end the thread in time (a file closed under epoll never wakes it).
    # The race a close without that care loses is a scheduling one: try several connections.
    monkeypatch.setattr(Connection, "IDLE_POLL", 600.0)
    for i in range(20):
        conn, handler = pair()
        assert conn.call("echo", i).wait(10) == (i,)
        conn.close()
        conn.join(10)
        assert not conn._reader.is_alive(), f"the reader slept through close() #{i}"
        assert handler.lost.is_set()
