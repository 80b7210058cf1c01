"""How far a ping is from this machine's floor: round trips with less and less in the way.

``python3 benchmarks/floor.py`` prints the p50 and p99 of:

* ``echo``: a bare uvloop echo server, a blocking client that reads its own reply (the floor);
* ``echo+thread``: the same, but a reader thread receives the reply and wakes the caller (the
  structure of ZEO's client, and of ours before callers read their own replies);
* ``raw ours`` / ``raw ref``: a ZEO ``ping`` call to our server and to ZEO 6.2's, from a
  blocking socket that frames and encodes by hand (the server's share, no client library);
* ``client ours`` / ``client ref``: ``ClientStorage.ping()`` of our client library against
  each server (the client library's share).

``python3 benchmarks/floor.py --page-cache`` instead times writing a 10 MiB file into the
page cache (after a ``sync()``, not timed), the step that ZODB's blob writes and both servers'
blob uploads share: on some virtual machines it costs ten times more at some moments than at
others, which moves the blob rows of ``run.py`` for both sides alike.

The reference server comes from ``.cache/zeo-ref`` (built by ``benchmarks/run.py`` or the test
suite).  Nothing here is a target; it explains the ping and blob rows of ``run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

MESSAGE = b"x" * 40


def echo_server() -> None:
    """Serve an echo on 127.0.0.1 (port printed on stdout) until killed."""

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def timed(count: int, once: Callable[[], object]) -> tuple[float, float]:
    """p50 and p99 in microseconds of ``count`` calls of ``once``, after a warm-up."""
    for _ in range(min(500, count)):
        once()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(count):
        t = clock()
        once()
        samples.append(clock() - t)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[len(samples) * 99 // 100] / 1000


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo_rows(count: int) -> list[tuple[str, tuple[float, float]]]:
    proc = subprocess.Popen([sys.executable, __file__, "--echo-server"], stdout=subprocess.PIPE,
                            text=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        sock = connect(port)

        def direct() -> None:
            sock.sendall(MESSAGE)
            sock.recv(100)

        rows = [("echo", timed(count, direct))]
        arrived = threading.Event()

        def reader() -> None:
            while sock.recv(100):
                arrived.set()

        threading.Thread(target=reader, daemon=True).start()

        def via_thread() -> None:
            arrived.clear()
            sock.sendall(MESSAGE)
            arrived.wait()

        rows.append(("echo+thread", timed(count, via_thread)))
        sock.close()
        return rows
    finally:
        proc.kill()
        proc.wait()


def server_rows(kind: str, count: int) -> list[tuple[str, tuple[float, float]]]:
    import ZEO
    from support.rawclient import RawClient
    from support.servers import filestorage_conf, start_server

    directory = Path(tempfile.mkdtemp(prefix=f"zeo-floor-{kind}-"))
    # This checkout's server, also where ZEO is not installed into this interpreter.
    env = dict(os.environ, PYTHONPATH=str(REPO / "src")) if kind == "ours" else None
    server = start_server(kind, directory, filestorage_conf(directory / "Data.fs"), env=env)
    try:
        raw = RawClient(server.addr)
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.handshake()
        raw.register("1")
        rows = [(f"raw {kind}", timed(count, lambda: raw.call("ping")))]
        raw.sock.close()
        client = ZEO.client(server.addr)
        try:
            rows.append((f"client {kind}", timed(count, client.ping)))
        finally:
            client.close()
        return rows
    finally:
        server.stop()


def page_cache_rows(count: int, size: int = 10 << 20) -> None:
    """Time ``count`` writes of ``size`` bytes, each to a new file after a ``sync()``; print
    them.  From the 11th on, the file written ten before is deleted, so later writes may get
    pages the kernel recycles rather than fresh ones."""
    payload = os.urandom(size)
    directory = Path(tempfile.mkdtemp(prefix="zeo-floor-pagecache-"))
    times = []
    try:
        for i in range(count):
            os.sync()
            path = directory / f"{i}.bin"
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(payload)
            times.append((time.perf_counter() - t0) * 1e3)
            if i >= 10:
                (directory / f"{i - 10}.bin").unlink()
    finally:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()
    times_sorted = sorted(times)
    print(f"write {size >> 20} MiB into the page cache, {count} times, ms: "
          f"min {times_sorted[0]:.1f}  median {times_sorted[count // 2]:.1f}  "
          f"max {times_sorted[-1]:.1f}")
    print("in order: " + " ".join(f"{t:.1f}" for t in times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pings", type=int, default=5000, help="round trips per row (default 5000)")
    p.add_argument("--no-ref", action="store_true", help="skip the rows of ZEO 6.2's server")
    p.add_argument("--page-cache", type=int, nargs="?", const=40, metavar="N",
                   help="time N writes of 10 MiB into the page cache instead (default 40)")
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.echo_server:
        echo_server()
        return 0
    if a.page_cache:
        page_cache_rows(a.page_cache)
        return 0
    rows = echo_rows(a.pings) + server_rows("ours", a.pings)
    if not a.no_ref:
        rows += server_rows("ref", a.pings)
    print(f"{'round trip':<14}{'p50 us':>9}{'p99 us':>9}")
    for name, (p50, p99) in rows:
        print(f"{name:<14}{p50:>9.0f}{p99:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
