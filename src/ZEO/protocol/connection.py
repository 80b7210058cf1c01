"""Sans-I/O connection state machines for both ends of a ZEO connection.

Neither class touches a socket: feed received bytes to ``receive_data()``, which yields
events, and write the ``bytes`` that the ``send_*`` methods return.  ``receive_data`` is a
generator so that a bad frame raises only after the good frames before it were handled.

Server events: :class:`Handshake`, :class:`RuokRequest`, :class:`UndecodableCall`, and call
messages, which are plain
``(msgid, flags, name, args)`` tuples (the hot path allocates nothing else).
Client events: :class:`Greeting`, then message tuples (replies and one-way server calls).
Heartbeats are swallowed on both sides.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from .codecs import Codec, codec_for_letter, exception_to_payload
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import DEFAULT_MAX_MESSAGE_SIZE, FrameDecoder, encode_frame
from .messages import FLAG_EXCEPTION, HEARTBEAT_MSGID, PROTOCOL_VERSION, REPLY, RUOK


class Handshake:
    """The client chose its encoding; ``protocol`` is e.g. ``b"Z5"``."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: bytes) -> None:
        self.protocol = protocol


class RuokRequest:
    """The peer sent ``ruok``: answer with :meth:`ServerConnection.send_status`, then close."""

    __slots__ = ()


class UndecodableCall:
    """A two-way call whose frame could not be decoded but whose msgid could: answer it with
    :meth:`ServerConnection.send_error`.  ``error`` says why (never the peer's data)."""

    __slots__ = ("msgid", "error")

    def __init__(self, msgid: int, error: RemoteProtocolError) -> None:
        self.msgid = msgid
        self.error = error


class Greeting:
    """The server announced ``protocol`` (e.g. ``b"M5"``); the client replied already."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: bytes) -> None:
        self.protocol = protocol


class _Base:
    def __init__(self, max_message_size: int) -> None:
        self._frames = FrameDecoder(max_message_size)
        self.max_message_size = max_message_size
        self.codec: Codec | None = None
        self.protocol: bytes | None = None

    def set_receive_limit(self, max_size: int) -> None:
        """Refuse received frames above ``max_size`` from now on (the server lowers it until
        the peer has registered)."""
        self._frames.max_size = max_size

    @property
    def buffered(self) -> int:
        """Bytes received that wait for the rest of their frame."""
        return self._frames.buffered

    def discard_buffered(self) -> None:
        """Free the partial frame received so far (the connection is gone)."""
        self._frames.clear()

    def _frame(self, msg: tuple) -> bytes:
        codec = self.codec
        if codec is None:
            raise LocalProtocolError("no message can be sent before the handshake")
        return codec.encode_frame(msg, self.max_message_size)

    def send_reply(self, msgid: Any, value: Any) -> bytes:
        """A normal reply; an unencodable value becomes an error reply instead."""
        try:
            return self._frame((msgid, 0, REPLY, value))
        except LocalProtocolError:
            raise
        except Exception:
            return self.send_error(msgid, ValueError("Couldn't pickle response"))

    def send_error(self, msgid: Any, exc: BaseException) -> bytes:
        try:
            return self._frame((msgid, FLAG_EXCEPTION, REPLY, exception_to_payload(exc)))
        except LocalProtocolError:
            raise
        except Exception:
            cls = type(exc)
            payload = (f"{cls.__module__}.{cls.__qualname__}", tuple(map(repr, exc.args)))
            return self._frame((msgid, FLAG_EXCEPTION, REPLY, payload))

    def send_call(self, msgid: Any, name: str, args: tuple, oneway: bool = False) -> bytes:
        return self._frame((msgid, oneway, name, args))


class ServerConnection(_Base):
    """The server end: announce, accept the client's letter, then decode calls."""

    def __init__(self, announce: bytes = b"Z5", max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE):
        super().__init__(max_message_size)
        if announce not in (b"Z5", b"M5"):
            raise LocalProtocolError(f"cannot announce {announce!r}")
        self.announce = announce

    def greeting(self) -> bytes:
        """The first frame the server sends."""
        return encode_frame(self.announce)

    def send_status(self, status: dict) -> bytes:
        return encode_frame(json.dumps(status).encode("ascii"))

    def send_oneway(self, name: str, args: tuple) -> bytes:
        return self._frame((0, True, name, args))

    def receive_data(self, data: bytes) -> Iterator[Any]:
        frames = self._frames.feed(data)
        for payload in frames:
            codec = self.codec
            if codec is None:
                yield self._handshake(payload)
                continue
            try:
                msg = codec.decode(payload)
            except RemoteProtocolError as e:
                head = codec.recover_call(payload)
                if head is None or head[1]:  # a one-way call cannot be answered
                    raise
                yield UndecodableCall(head[0], e)
                continue
            if msg[0] == HEARTBEAT_MSGID:
                continue
            yield msg

    def _handshake(self, payload: bytes) -> Handshake | RuokRequest:
        if payload == RUOK:
            return RuokRequest()
        letter, version = payload[:1], payload[1:]
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"bad handshake {payload[:20]!r}")
        if letter == b"Z" and self.announce == b"M5":
            # A server told to speak msgpack decodes no pickle at all (ZEO accepts either).
            raise RemoteProtocolError("a pickle (Z5) client on a msgpack-only server")
        self.codec = codec_for_letter(letter, server=True)
        self.protocol = payload
        return Handshake(payload)


class ClientConnection(_Base):
    """The client end: answer the greeting with the server's letter, then decode replies."""

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self.handshake_reply: bytes | None = None

    def send_heartbeat(self) -> bytes:
        return self._frame((HEARTBEAT_MSGID, 0, REPLY, None))

    def receive_data(self, data: bytes) -> Iterator[Any]:
        frames = self._frames.feed(data)
        for payload in frames:
            codec = self.codec
            if codec is None:
                yield self._greeting(payload)
                continue
            msg = codec.decode(payload)
            if msg[0] == HEARTBEAT_MSGID and msg[2] == REPLY:
                continue
            yield msg

    def _greeting(self, payload: bytes) -> Greeting:
        letter, version = payload[:1], payload[1:]
        # ZEO compares versions as bytes: anything >= b"5" speaks 5.
        if min(version, PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise RemoteProtocolError(f"unsupported server protocol {payload!r:.60}")
        self.codec = codec_for_letter(letter, server=False)
        self.protocol = letter + PROTOCOL_VERSION
        self.handshake_reply = encode_frame(self.protocol)
        return Greeting(payload)
