"""A raw-socket ZEO peer for tests: connect, handshake, send and receive frames by hand.

It uses our sans-I/O codecs to build and read messages, but can also write arbitrary bytes, so
tests can send what no well-behaved client would.  Every blocking read has a timeout.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

from ZEO.protocol import MsgpackCodec, PickleCodec, encode_frame
from ZEO.wire import ConnectionClosed

Z64 = b"\0" * 8




class RawClient:
    """One TCP or Unix-socket connection to a ZEO server, driven frame by frame."""

    def __init__(self, addr, timeout: float = 10.0) -> None:
        family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.timeout = timeout
        self._buf = bytearray()
        self.codec: PickleCodec | MsgpackCodec | None = None
        self.greeting: bytes | None = None
        self._msgid = 0
        self.oneways: list[tuple[str, Any]] = []  # server one-way calls seen by call()

    # -- bytes and frames -------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, payload: bytes) -> None:
        self.sock.sendall(encode_frame(payload))

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError as e:
                raise ConnectionClosed("reset") from e
            if not chunk:
                raise ConnectionClosed("EOF")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def recv_frame(self) -> bytes:
        (n,) = struct.unpack(">I", self._read_exact(4))
        return self._read_exact(n)

    # -- handshake and messages ---------------------------------------------------------------
    def read_greeting(self) -> bytes:
        self.greeting = self.recv_frame()
        return self.greeting

    def handshake(self, letter: bytes | None = None) -> bytes:
        """Read the greeting and answer with ``letter`` (default: the server's) plus ``5``."""
        greeting = self.read_greeting()
        letter = letter or greeting[:1]
        self.send_frame(letter + b"5")
        self.codec = PickleCodec() if letter == b"Z" else MsgpackCodec()
        return greeting

    def send_message(self, msg: tuple) -> None:
        assert self.codec is not None, "handshake first"
        self.send_frame(self.codec.encode(msg))

    def recv_message(self) -> tuple:
        assert self.codec is not None, "handshake first"
        return self.codec.decode(self.recv_frame())

    def call(self, name: str, *args: Any) -> Any:
        """A two-way call; returns the reply value, raises :class:`RemoteError` on flags 2.

        One-way server calls arriving meanwhile (``info``, ``invalidateTransaction``) are kept
        in :attr:`oneways`.
        """
        self._msgid += 1
        msgid = self._msgid
        self.send_message((msgid, False, name, args))
        while True:
            got_id, flags, got_name, value = self.recv_message()
            if got_name != ".reply":
                self.oneways.append((got_name, value))
                continue
            assert got_id == msgid, (got_id, msgid)
            if flags == 2:
                raise RemoteError(*value)
            return value

    def oneway(self, name: str, *args: Any) -> None:
        self.send_message((0, True, name, args))

    def register(self, storage_id: str = "1", read_only: bool = False) -> Any:
        return self.call("register", storage_id, read_only)

    # -- closing --------------------------------------------------------------------------------
    def is_closed_by_peer(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` for EOF/reset, discarding any frames; True if it came."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._buf.clear()
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
        self.sock.settimeout(self.timeout)
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteError(Exception):
    """An error reply: ``args == (class_name, payload)``."""

