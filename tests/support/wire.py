"""A small synchronous ZEO wire client for tests: raw frames, raw calls, nothing hidden.

It speaks through ZEO.protocol.ClientConnection, so it exercises our sans-I/O core, and lets a
test send anything (bad frames, calls out of order) and see exactly what comes back.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from ZEO.protocol import ClientConnection, Greeting, encode_frame


class Closed(Exception):
    """The server closed the connection."""


class WireClient:
    def __init__(self, addr: Any, protocol: bytes | None = None, timeout: float = 10.0,
                 handshake: bool = True) -> None:
        family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.conn = ClientConnection()
        self.pending: list[Any] = []  # decoded messages not consumed yet
        self.oneways: list[tuple] = []  # server one-way calls seen while waiting for replies
        self.greeting = self.read_raw_frame()
        self.next_msgid = 1
        if handshake:
            # Answer with ``protocol``'s letter (default: the server's), as a ZEO client does.
            chosen = (protocol or self.greeting)[:1] + self.greeting[1:]
            (event,) = self.conn.receive_data(encode_frame(chosen))
            assert isinstance(event, Greeting)
            self.send_raw_frame(self.conn.handshake_reply[4:])  # type: ignore[index]

    # -- raw frames ---------------------------------------------------------------------

    def _recv_exactly(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Closed()
            buf += chunk
        return buf

    def read_raw_frame(self) -> bytes:
        (n,) = struct.unpack(">I", self._recv_exactly(4))
        return self._recv_exactly(n)

    def send_raw_frame(self, payload: bytes) -> None:
        self.sock.sendall(encode_frame(payload))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    # -- messages -----------------------------------------------------------------------

    def read_message(self) -> tuple:
        return self.conn.codec.decode(self.read_raw_frame())  # type: ignore[union-attr]

    def send_message(self, msg: tuple) -> None:
        self.send_raw_frame(self.conn.codec.encode(msg))  # type: ignore[union-attr]

    def async_call(self, name: str, *args: Any) -> None:
        self.send_message((0, True, name, args))

    def send_call(self, name: str, *args: Any) -> int:
        msgid = self.next_msgid
        self.next_msgid += 1
        self.send_message((msgid, False, name, args))
        return msgid

    def wait_reply(self, msgid: Any) -> tuple[int, Any]:
        """``(flags, value)`` of the reply to ``msgid``; one-way calls are kept in ``oneways``."""
        while True:
            msg = self.read_message()
            if msg[2] != ".reply":
                self.oneways.append(msg)
                continue
            if msg[0] == msgid:
                return msg[1], msg[3]
            self.pending.append(msg)

    def call(self, name: str, *args: Any) -> Any:
        """A two-way call; an error reply raises ``RemoteError``."""
        flags, value = self.wait_reply(self.send_call(name, *args))
        if flags:
            raise RemoteError(*value)
        return value

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteError(Exception):
    """An error reply: ``args == (class name, payload)``."""

    @property
    def class_name(self) -> str:
        return self.args[0]
