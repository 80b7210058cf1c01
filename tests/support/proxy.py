"""A fault-injecting TCP proxy for tests (the asyncpg approach).

:class:`FaultProxy` listens on 127.0.0.1 (port from the kernel) and forwards every accepted
connection to ``target``, both directions, from one daemon thread running its own asyncio loop.
Faults, all callable from any thread:

* :meth:`cut` closes both sides of every current connection (FIN);
* :meth:`reset` aborts both sides with SO_LINGER 0 (RST);
* :meth:`hold` / :meth:`release` stop and restart forwarding without closing anything: bytes
  stay queued, so the peers see a silent, half-open link;
* :meth:`delay` adds a latency to every forwarded chunk;
* :meth:`refuse` closes new connections at once (a server that is down, seen through the proxy);
* :meth:`on` arms a trigger: when a chunk going one way contains a byte pattern (e.g. a method
  name such as ``b"tpc_finish"``), cut or reset that connection *before* or *after*
  forwarding the chunk.  This places a fault at an exact point of the protocol.

Counters: :attr:`bytes_up` (client to server), :attr:`bytes_down`, :attr:`connections`
(accepted so far), :meth:`active` (open now) and :attr:`fired` (triggers that fired).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any

UP = "up"  # client -> server
DOWN = "down"  # server -> client


@dataclass
class Trigger:
    """Fire ``action`` ("cut" or "reset") on every ``every``-th chunk holding ``pattern``."""

    direction: str
    pattern: bytes
    when: str  # "before" or "after" forwarding the chunk
    action: str
    every: int
    limit: int | None
    seen: int = 0
    fired: int = 0


class _Pair:
    """One proxied connection: the client-side and the server-side streams."""

    def __init__(self, proxy: FaultProxy, client_w: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client_w = client_w
        self.server_w: asyncio.StreamWriter | None = None
        self.closed = False

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for w in (self.client_w, self.server_w):
            if w is None:
                continue
            if reset:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    except OSError:
                        pass
                w.transport.abort()
            else:
                w.close()
        self.proxy._pairs.discard(self)


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target`` ((host, port)); see the module docstring."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.fired = 0
        self._pairs: set[_Pair] = set()
        self._triggers: list[Trigger] = []
        self._delay = 0.0
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.AbstractServer | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fault proxy",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._server is None:
            raise RuntimeError("the fault proxy did not start")
        self.addr: tuple[str, int] = self._server.sockets[0].getsockname()[:2]

    # -- control (any thread) ------------------------------------------------------------

    def _do(self, func: Any, *args: Any) -> Any:
        async def run() -> Any:
            return func(*args)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def cut(self) -> int:
        """Close both sides of every open connection; return how many."""
        return self._do(self._close_all, False)

    def reset(self) -> int:
        """Abort every open connection with a TCP RST; return how many."""
        return self._do(self._close_all, True)

    def hold(self) -> None:
        """Stop forwarding in both directions (connections stay open)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def release(self) -> None:
        """Forward again, starting with what was held."""
        self._loop.call_soon_threadsafe(self._flowing.set)

    def delay(self, seconds: float) -> None:
        """Wait ``seconds`` before forwarding each chunk (0 to stop delaying)."""
        self._delay = float(seconds)

    def refuse(self, refusing: bool = True) -> None:
        """Close new connections at once while ``refusing``."""
        self._refusing = refusing

    def on(self, direction: str, pattern: bytes, *, when: str = "before", action: str = "cut",
           every: int = 1, limit: int | None = None) -> Trigger:
        """Arm a trigger (see the module docstring); returns it (its ``fired`` counts)."""
        assert direction in (UP, DOWN) and when in ("before", "after")
        assert action in ("cut", "reset")
        trigger = Trigger(direction, pattern, when, action, every, limit)
        self._do(self._triggers.append, trigger)
        return trigger

    def clear_triggers(self) -> None:
        self._do(self._triggers.clear)

    def active(self) -> int:
        return self._do(len, self._pairs)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            self._close_all(False)
            if self._server is not None:
                self._server.close()
            self._flowing.set()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the loop thread -------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", 0))
        finally:
            ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def _close_all(self, reset: bool) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            pair.close(reset)
        return len(pairs)

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refusing:
            client_w.close()
            return
        pair = _Pair(self, client_w)
        self._pairs.add(pair)
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            pair.close()
            return
        pair.server_w = server_w
        if pair.closed:  # cut while connecting
            server_w.close()
            return
        for w in (client_w, server_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self._pump(pair, client_r, server_w, UP),
                             self._pump(pair, server_r, client_w, DOWN))
        pair.close()

    def _check(self, pair: _Pair, direction: str, chunk: bytes, when: str) -> bool:
        """Run the triggers for ``chunk``; True when the pair was closed."""
        for t in self._triggers:
            if t.direction != direction or t.when != when or t.pattern not in chunk:
                continue
            if t.limit is not None and t.fired >= t.limit:
                continue
            t.seen += 1
            if t.seen % t.every == 0:
                t.fired += 1
                self.fired += 1
                pair.close(reset=t.action == "reset")
                return True
        return False

    async def _pump(self, pair: _Pair, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while not pair.closed:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                await self._flowing.wait()
                if self._delay:
                    await asyncio.sleep(self._delay)
                    await self._flowing.wait()
                if pair.closed or self._check(pair, direction, chunk, "before"):
                    return
                writer.write(chunk)
                if direction == UP:
                    self.bytes_up += len(chunk)
                else:
                    self.bytes_down += len(chunk)
                if self._check(pair, direction, chunk, "after"):
                    return
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            pair.close()
