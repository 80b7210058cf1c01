"""A small synchronous ZEO wire client: one blocking socket, raw calls, no cache, no threads.

Used by the ``zeo`` command (:mod:`ZEO.cli`) and by tests.  It speaks through
:class:`ZEO.protocol.ClientConnection`, so it talks to any ZEO 5/6 server (ours or the real one).
Frames are decoded incrementally, so a read that times out never loses a partial frame.
"""

from __future__ import annotations

import json
import socket
import ssl as _ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from . import address
from .protocol import ClientConnection, Greeting, encode_frame, payload_to_exception

Address = address.Address


class ConnectionClosed(Exception):
    """The server closed the connection."""


class RemoteError(Exception):
    """An error reply: ``args == (class name, payload)``, as it came over the wire."""

    @property
    def class_name(self) -> str:
        return self.args[0]

    @property
    def payload(self) -> Any:
        return self.args[1]

    def exception(self) -> BaseException:
        """The exception a ZEO client would raise for this reply."""
        return payload_to_exception(self.args[0], self.args[1])

    def __str__(self) -> str:
        payload = self.args[1]
        if isinstance(payload, dict):
            detail = payload.get("message") or payload
        elif isinstance(payload, (tuple, list)) and len(payload) == 1:
            detail = payload[0]
        else:
            detail = payload
        return f"{self.args[0]}: {detail}"


def connect(addr: Address, timeout: float = 10.0, ssl: _ssl.SSLContext | None = None,
            server_hostname: str | None = None) -> socket.socket:
    """A connected (and, with ``ssl``, TLS-wrapped) blocking socket."""
    if isinstance(addr, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(addr, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl is not None:
        if server_hostname is None and not isinstance(addr, str):
            server_hostname = addr[0]
        sock = ssl.wrap_socket(sock, server_hostname=server_hostname)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed()
        buf += chunk
    return buf


def ruok(addr: Address, timeout: float = 10.0, ssl: _ssl.SSLContext | None = None,
         server_hostname: str | None = None) -> tuple[bytes, dict]:
    """Ask a server for its status without registering: ``(greeting, {storage_id: status})``."""
    with connect(addr, timeout, ssl, server_hostname) as sock:
        (n,) = struct.unpack(">I", _recv_exactly(sock, 4))
        greeting = _recv_exactly(sock, n)
        sock.sendall(encode_frame(b"ruok"))
        (n,) = struct.unpack(">I", _recv_exactly(sock, 4))
        return greeting, json.loads(_recv_exactly(sock, n).decode("ascii"))


class WireClient:
    """One connection to a ZEO server, used synchronously.

    The handshake is done in the constructor (answering with ``protocol``'s letter, default
    the server's).  ``call`` sends a two-way call and waits for its reply; one-way calls from
    the server (``info``, ``invalidateTransaction``...) are kept in :attr:`oneways`.
    """

    def __init__(self, addr: Address, protocol: bytes | None = None, timeout: float = 10.0,
                 ssl: _ssl.SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self.sock = connect(addr, timeout, ssl, server_hostname)
        self.core = ClientConnection()
        self.oneways: list[tuple] = []
        self._replies: dict[Any, tuple[Any, Any]] = {}
        self._next_msgid = 1
        try:
            (n,) = struct.unpack(">I", _recv_exactly(self.sock, 4))
            self.greeting = _recv_exactly(self.sock, n)
            chosen = (protocol or self.greeting)[:1] + self.greeting[1:]
            (event,) = self.core.receive_data(encode_frame(chosen))
            assert isinstance(event, Greeting)
            self.sock.sendall(self.core.handshake_reply)  # type: ignore[arg-type]
        except BaseException:
            self.sock.close()
            raise

    @property
    def protocol(self) -> bytes | None:
        """The protocol spoken, e.g. ``b"Z5"``."""
        return self.core.protocol

    def send_message(self, msg: tuple) -> None:
        self.sock.sendall(encode_frame(self.core.codec.encode(msg)))  # type: ignore[union-attr]

    def send_call(self, name: str, *args: Any) -> int:
        msgid = self._next_msgid
        self._next_msgid += 1
        self.send_message((msgid, False, name, args))
        return msgid

    def async_call(self, name: str, *args: Any) -> None:
        self.send_message((0, True, name, args))

    def _read_some(self, timeout: float | None) -> bool:
        """Read and dispatch what arrives within ``timeout``; False when nothing came."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except (TimeoutError, _ssl.SSLWantReadError):
            return False
        except (ConnectionResetError, BrokenPipeError):
            raise ConnectionClosed()
        if not data:
            raise ConnectionClosed()
        for msg in self.core.receive_data(data):
            if msg[2] == ".reply":
                self._replies[msg[0]] = (msg[1], msg[3])
            else:
                self.oneways.append(msg)
        return True

    def wait_reply(self, msgid: Any, tick: Callable[[], None] | None = None,
                   tick_interval: float = 0.1) -> tuple[Any, Any]:
        """``(flags, value)`` of the reply to ``msgid``.

        Without ``tick``, waits at most the connection's timeout for data (TimeoutError);
        with it, waits without limit and calls ``tick()`` every ``tick_interval`` seconds.
        """
        deadline = None if tick is not None else time.monotonic() + self.timeout
        while msgid not in self._replies:
            got = self._read_some(tick_interval if tick is not None else self.timeout)
            if not got:
                if tick is not None:
                    tick()
                elif deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no reply from {address.format(self.addr)}")
        return self._replies.pop(msgid)

    def call(self, name: str, *args: Any, tick: Callable[[], None] | None = None) -> Any:
        """A two-way call; an error reply raises :class:`RemoteError`."""
        flags, value = self.wait_reply(self.send_call(name, *args), tick=tick)
        if flags:
            raise RemoteError(*value)
        return value

    def register(self, storage_id: str = "1", read_only: bool = True) -> bytes:
        """Register on ``storage_id``; returns the storage's last tid."""
        return self.call("register", storage_id, read_only)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
