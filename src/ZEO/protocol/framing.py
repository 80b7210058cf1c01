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
    allocate.  A large frame that arrives in pieces is kept as the list of its pieces and
    joined once, so its bytes are copied once, not once per piece.  ``buffered`` tells how
    many bytes wait for the rest of their frame.
    """

    __slots__ = ("_buf", "_parts", "_need", "_size", "max_size")

    #: Partial frames at least this large are collected as pieces instead of a buffer (blob
    #: chunks are 59,000-byte frames: buffered, each of their bytes was copied three times).
    LARGE = 4 * 1024

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()  # a partial header, or the start of a small frame
        self._parts: list = []  # the pieces received so far of a large frame
        self._need = 0  # bytes still missing from that large frame
        self._size = 0  # its length
        self.max_size = max_size

    def clear(self) -> None:
        """Drop whatever partial frame is buffered (the connection is gone)."""
        self._buf = bytearray()
        self._parts = []
        self._need = self._size = 0

    @property
    def buffered(self) -> int:
        large = self._size + 4 - self._need if self._need else 0  # 4: its header
        return len(self._buf) + large

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self._need:
            need = self._need
            if len(data) < need:
                self._parts.append(data if type(data) is bytes else bytes(data))
                self._need = need - len(data)
                return out
            view = memoryview(data)
            self._parts.append(view[:need])
            out.append(b"".join(self._parts))
            self._parts = []
            self._need = 0
            data = view[need:]  # type: ignore[assignment]
            if not data:
                return out
        buf = self._buf
        if buf:
            buf += data
            data = buf  # type: ignore[assignment]
        frames, pos = self._split(data)
        out += frames
        end = len(data)
        if end - pos >= 4:
            (n,) = _unpack_header(data, pos)  # _split checked it against max_size
            if n >= self.LARGE:
                piece = _copy(data, pos + 4, end)
                self._parts = [piece]
                self._need = n - len(piece)
                self._size = n
                buf.clear()
                return out
        if data is buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        return out

    def _split(self, data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
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
            out.append(_copy(data, pos + 4, pos + 4 + n))
            pos += 4 + n
        return out, pos


def _copy(data: bytes | bytearray | memoryview, start: int, end: int) -> bytes:
    """``bytes(data[start:end])`` with one copy: slicing a bytearray copies it once already."""
    if type(data) is bytearray:
        with memoryview(data) as view:
            return view[start:end].tobytes()
    return bytes(data[start:end])
