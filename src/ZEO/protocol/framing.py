"""Sized-message framing: a 4-byte unsigned big-endian length, then the payload."""

from __future__ import annotations

import struct

from .errors import FrameTooLarge, LocalProtocolError

HEADER = struct.Struct(">I")
#: Default largest payload accepted or sent (ZEO itself has no limit but 2**32-1).
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack


def encode_frame(payload: bytes, max_size: int = 0xFFFFFFFF) -> bytes:
    """Return ``payload`` with its length header; refuse payloads above ``max_size``."""
    n = len(payload)
    if n > max_size:
        raise LocalProtocolError(f"message of {n} bytes exceeds the limit of {max_size}")
    return _pack_header(n) + payload


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete payloads back.

    ``feed`` raises :class:`FrameTooLarge` as soon as a header announces more than
    ``max_size`` bytes, before buffering the payload, so a hostile length cannot make us
    allocate.  ``buffered`` tells how many bytes wait for the rest of their frame.
    """

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if buf:
            buf += data
            out, pos = self._split(buf)
            del buf[:pos]
        else:
            # Whole frames come straight out of ``data``; only a partial tail is copied.
            out, pos = self._split(data)
            if pos < len(data):
                buf += data[pos:]
        return out

    def _split(self, data: bytes | bytearray) -> tuple[list[bytes], int]:
        """The complete frames at the start of ``data`` and the offset where they end."""
        out = []
        pos = 0
        end = len(data)
        max_size = self.max_size
        while end - pos >= 4:
            (n,) = _unpack_header(data, pos)
            if n > max_size:
                raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {max_size}")
            if end - pos - 4 < n:
                break
            out.append(bytes(data[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return out, pos
