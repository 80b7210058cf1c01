"""The ZEO client cache: object records a client keeps so that it need not ask the server again.

``ClientCache(path=None, size, rearrange)`` keeps everything in memory; with a ``path`` it
returns a :class:`PersistentClientCache` (same API) that keeps the records in a file, so that
a restarted client only reloads what changed while it was away.

Records
    A record is ``(oid, start_tid, end_tid, data)``.  ``end_tid`` None means *current*: the
    newest revision the cache knows of.  Non-current records are kept per oid in a list
    sorted by ``start_tid``, so ``loadBefore`` is one dict lookup and one bisection.

In memory (``path=None``)
    The records share one LRU list (an ``OrderedDict`` keyed by the record objects).  Each
    record costs ``len(data) + RECORD_OVERHEAD`` bytes of the ``size`` budget; the least
    recently used records, current or not, are evicted when the budget is exceeded.
    ``rearrange`` is not used in memory.

Persistent (``path`` given): a log in a ring
    The file is ``DATA_START`` (64) bytes of header (magic ``ZNGCACHE``, version, a CLEAN flag
    and the token of the index, crc32) followed by a ring of records.  Every change is one
    appended record, written with one ``pwrite`` at the *head*:

    ``D`` data (oid, start, end or z64, data), ``I`` invalidate (oid, start, end), ``F`` forget
    the oid, ``T`` new last tid, ``P`` free space.  A record is a 60-byte header (marker ``zR``,
    kind, slot size, sequence number, the cache's last tid at that write, oid, start, end,
    data length, crc32 of the data, crc32 of the header) then the data.  Sequence numbers go up
    by one per record, so the cache's state is a replay of the records in sequence order and
    the last tid is in the newest record (written at once by ``setLastTid``).

    The ring is bounded by ``size`` (the file never grows past it).  The head overwrites the
    oldest records whole (evicting their data) and marks the rest of the overwritten span with
    a ``P`` header; when a record does not fit before ``size``, the file is truncated at the
    head and writing starts again at ``DATA_START``.  So the ring is FIFO; dropping the oldest
    records of a log never leaves a stale record.  A record read from more than
    ``rearrange * size`` behind the head is copied to the head (it is in use: keep it).

    Crash safety: a load reads header and data in one ``pread`` and checks both checksums and
    the sequence number; a damaged record is never returned, and an ``F`` record drops its oid.
    On open after a crash the headers are scanned from ``DATA_START`` (in 1 MiB sequential
    reads; records over 64 KiB are jumped over; data checksums are left to ``load``); the scan
    stops at the first bad header and the file is truncated there.  Only the newest run of
    consecutive sequence numbers is kept: a write lost or torn by a crash ends the run, so the
    state is always that after some prefix of the writes (possibly older, never inconsistent:
    the client then verifies from the older last tid).  ``clear`` truncates and ``fsync``s.

    Fast open: ``close`` writes ``<path>.index`` (the live data records, head, sequence, last
    tid, a random token, crc32), ``fsync``s it, then sets CLEAN and the token in the header.
    ``open`` uses the index only if CLEAN is set, the token, crc and file size match and no
    newer record sits at the head; it then clears CLEAN (``fsync``) and deletes the index
    before any other write.  Otherwise it scans headers only.  ``statistics()`` reports
    ``open_mode`` (new, index, scan, rebuilt), ``open_records_scanned`` and ``open_bytes_read``.

    A file with a bad header is renamed ``<path>.bad`` and a new one created; ``<path>.lock``
    (zc.lockfile) keeps a second process or ClientCache out (:class:`CacheLockedError`).  An
    I/O error while writing empties the file and turns the cache off (it then misses).

Tracing: with ``ZEO_CACHE_TRACE`` non-empty, a persistent cache appends 40-byte records to
``<path>.trace``: ``struct ">dB3xI8s8s8s"`` = time (float seconds), code (zeo-facts §6.4:
0x00 start, 0x10/0x1C/0x1E invalidate miss/kept non-current/discarded, 0x20/0x22 load miss/hit,
0x24/0x26 loadBefore miss/non-current hit, 0x52/0x54 store current/non-current), data length,
oid, tid, end tid (z64 for none).

Thread safety: every public method holds ``self._lock`` (an ``RLock``).
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

import zc.lockfile

__all__ = [
    "CacheLockedError", "ClientCache", "PersistentClientCache", "RECORD_OVERHEAD", "cache_path",
]

logger = logging.getLogger(__name__)

z64 = b"\0" * 8

#: Bytes of the ``size`` budget charged per record on top of its data (memory mode).
RECORD_OVERHEAD = 64

_start_of = attrgetter("start")


class _Record:
    """One cached revision.  Hashed by identity (used as the LRU key).

    ``data`` is set in memory mode; ``pos``/``seq``/``slot``/``dlen`` in file mode.
    """

    __slots__ = ("oid", "start", "end", "data", "pos", "seq", "slot", "dlen", "live")

    def __init__(
        self, oid: bytes, start: bytes, end: bytes | None, data: bytes | None,
        pos: int = 0, seq: int = 0, slot: int = 0, dlen: int = 0,
    ) -> None:
        self.oid = oid
        self.start = start
        self.end = end
        self.data = data
        self.pos = pos
        self.seq = seq
        self.slot = slot
        self.dlen = dlen if data is None else len(data)
        self.live = True


class ClientCache:
    """A bounded cache of object records (see the module docstring).

    ``ClientCache(path)`` with a path returns a :class:`PersistentClientCache`.
    """

    path: str | None
    maxsize: int

    def __new__(cls, path: Any = None, size: int = 20 * 1024 * 1024, rearrange: float = 0.8):
        if cls is ClientCache and path is not None:
            cls = PersistentClientCache
        return object.__new__(cls)

    def __init__(
        self, path: Any = None, size: int = 20 * 1024 * 1024, rearrange: float = 0.8
    ) -> None:
        self.path = None
        self.maxsize = int(size)
        self.rearrange = rearrange
        self._lock = threading.RLock()
        self._init_state()
        self._lru: OrderedDict[_Record, None] = OrderedDict()
        self._bytes = 0

    def _init_state(self) -> None:
        self._reset_index()
        # statistics
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._store_bytes = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._invalidations = 0

    def _reset_index(self) -> None:
        self._current: dict[bytes, _Record] = {}
        self._noncurrent: dict[bytes, list[_Record]] = {}
        self._last_tid: bytes | None = None
        self._count = 0

    # -- helpers shared by both modes (caller holds the lock) ---------------------------------

    def _find_noncurrent(self, oid: bytes, before_tid: bytes) -> _Record | None:
        """The non-current record with ``start < before_tid <= end``, or None."""
        lst = self._noncurrent.get(oid)
        if lst:
            i = bisect.bisect_left(lst, before_tid, key=_start_of) - 1
            if i >= 0:
                r = lst[i]
                if before_tid <= r.end:  # type: ignore[operator]
                    return r
        return None

    def _noncurrent_at(self, oid: bytes, start: bytes) -> _Record | None:
        lst = self._noncurrent.get(oid)
        if lst:
            i = bisect.bisect_left(lst, start, key=_start_of)
            if i < len(lst) and lst[i].start == start:
                return lst[i]
        return None

    def _add_noncurrent(self, r: _Record) -> None:
        lst = self._noncurrent.get(r.oid)
        if lst is None:
            self._noncurrent[r.oid] = [r]
        else:
            bisect.insort(lst, r, key=_start_of)
        self._count += 1

    def _unlink(self, r: _Record) -> None:
        """Remove ``r`` from the index (not from the LRU/ring)."""
        r.live = False
        self._count -= 1
        if r.end is None:
            del self._current[r.oid]
        else:
            lst = self._noncurrent[r.oid]
            lst.remove(r)
            if not lst:
                del self._noncurrent[r.oid]

    def _replace(self, old: _Record, new: _Record) -> None:
        """Put ``new`` in ``old``'s place in the index (same oid and start)."""
        old.live = False
        if old.end is None:
            self._current[old.oid] = new
        else:
            lst = self._noncurrent[old.oid]
            lst[lst.index(old)] = new

    # -- the API --------------------------------------------------------------------------------

    def load(self, oid: bytes) -> tuple[bytes, bytes] | None:
        """``(data, start_tid)`` of the current record of ``oid``, or None."""
        with self._lock:
            r = self._current.get(oid)
            if r is None:
                self._misses += 1
                return None
            self._lru.move_to_end(r)
            self._hits += 1
            return r.data, r.start  # type: ignore[return-value]

    def loadBefore(self, oid: bytes, before_tid: bytes) -> tuple[bytes, bytes, bytes | None] | None:
        """The revision of ``oid`` current just before ``before_tid``: ``(data, start, end)``.

        That is the current record when its start < ``before_tid`` (end None), else the
        non-current record with ``start < before_tid <= end``; None if the cache has neither.
        """
        with self._lock:
            r = self._current.get(oid)
            if r is None or r.start >= before_tid:
                r = self._find_noncurrent(oid, before_tid)
                if r is None:
                    self._misses += 1
                    return None
            self._lru.move_to_end(r)
            self._hits += 1
            return r.data, r.start, r.end  # type: ignore[return-value]

    def store(self, oid: bytes, start_tid: bytes, end_tid: bytes | None, data: bytes) -> None:
        """Remember a revision; ``end_tid`` None means it is current.

        A current record that duplicates or is older than the cached current one is ignored;
        a newer one replaces it.  A record too big for the whole budget is not kept.
        """
        with self._lock:
            if end_tid is not None and end_tid <= start_tid:
                raise ValueError(f"end_tid {end_tid!r} <= start_tid {start_tid!r}")
            if not self._accept(oid, start_tid, end_tid):
                return
            cost = len(data) + RECORD_OVERHEAD
            if cost > self.maxsize:
                return
            r = _Record(oid, start_tid, end_tid, data)
            if end_tid is None:
                self._current[oid] = r
                self._count += 1
            else:
                self._add_noncurrent(r)
            self._lru[r] = None
            self._bytes += cost
            self._stores += 1
            self._store_bytes += len(data)
            if self._bytes > self.maxsize:
                self._evict()

    def _accept(self, oid: bytes, start_tid: bytes, end_tid: bytes | None) -> bool:
        """Whether a new record should be stored; drops a cached current it supersedes."""
        if end_tid is None:
            cur = self._current.get(oid)
            if cur is not None:
                if cur.start >= start_tid:
                    return False
                self._drop(cur)
            return True
        if self._noncurrent_at(oid, start_tid) is not None:
            return False
        cur = self._current.get(oid)
        # The cached current revision cannot also be a non-current one.
        return cur is None or cur.start != start_tid

    def _drop(self, r: _Record) -> None:
        """Forget one record entirely (memory mode: also from the LRU)."""
        self._unlink(r)
        del self._lru[r]
        self._bytes -= len(r.data) + RECORD_OVERHEAD  # type: ignore[arg-type]

    def _evict(self) -> None:
        lru = self._lru
        while self._bytes > self.maxsize and lru:
            r, _ = lru.popitem(last=False)
            self._unlink(r)
            n = len(r.data)  # type: ignore[arg-type]
            self._bytes -= n + RECORD_OVERHEAD
            self._evictions += 1
            self._evicted_bytes += n

    def invalidate(self, oid: bytes, tid: bytes | None) -> None:
        """Record that ``oid`` changed in ``tid``.

        ``tid`` None forgets every record of ``oid``.  Otherwise the current record (if any)
        becomes non-current, ending at ``tid``; an invalidation with the current record's own
        start tid is ignored; one older than that start drops the record (it cannot be right).
        """
        with self._lock:
            self._invalidations += 1
            if tid is None:
                self._apply_forget(oid)
                return
            cur = self._current.get(oid)
            if cur is None:
                return
            if cur.start == tid:
                # Normal: a load read after the commit reached the server before its
                # invalidation was written (zeo-facts §4.4); the record is already current.
                logger.debug("invalidation of %r with the tid of its current record", oid)
                return
            self._apply_invalidate(cur, tid)

    def _apply_forget(self, oid: bytes) -> None:
        cur = self._current.get(oid)
        if cur is not None:
            self._drop(cur)
        for r in list(self._noncurrent.get(oid, ())):
            self._drop(r)

    def _apply_invalidate(self, cur: _Record, tid: bytes) -> None:
        """Make the current record ``cur`` non-current, ending at ``tid`` (!= its start)."""
        if cur.start > tid:
            self._drop(cur)
            return
        oid = cur.oid
        del self._current[oid]
        self._count -= 1
        cur.end = tid
        old = self._noncurrent_at(oid, cur.start)
        if old is not None:
            self._drop(old)
        self._add_noncurrent(cur)

    def getLastTid(self) -> bytes | None:
        """The tid the cache is up to date with, or None."""
        with self._lock:
            return self._last_tid

    def setLastTid(self, tid: bytes | None) -> None:
        """Move the last tid; ValueError if that goes backwards while the cache holds records.

        None and ``z64`` are ignored; an equal value is accepted.
        """
        if tid is None or tid == z64:
            return
        with self._lock:
            last = self._last_tid
            if last is not None and tid < last and self._count:
                raise ValueError(f"new last tid {tid!r} must not be older than {last!r}")
            self._last_tid = tid

    def clear(self) -> None:
        """Forget every record and the last tid."""
        with self._lock:
            self._current.clear()
            self._noncurrent.clear()
            for r in self._lru:
                r.live = False
            self._lru.clear()
            self._bytes = 0
            self._count = 0
            self._last_tid = None

    def close(self) -> None:
        """Release resources (memory mode: nothing to do)."""

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def contents(self) -> Iterator[tuple[bytes, bytes]]:
        """``(oid, start_tid)`` of every record (a snapshot)."""
        with self._lock:
            out = [(oid, r.start) for oid, r in self._current.items()]
            for oid, lst in self._noncurrent.items():
                out.extend((oid, r.start) for r in lst)
        return iter(out)

    def getStats(self) -> tuple[int, int, int, int, int]:
        """``(stores, stored bytes, evictions, evicted bytes, accesses)`` as ZEO's cache."""
        with self._lock:
            return (
                self._stores,
                self._store_bytes,
                self._evictions,
                self._evicted_bytes,
                self._hits + self._misses,
            )

    def statistics(self) -> dict[str, Any]:
        """Counters and sizes as a plain dict."""
        with self._lock:
            return {
                "path": self.path,
                "maxsize": self.maxsize,
                "records": self._count,
                "current": len(self._current),
                "bytes": self._size_used(),
                "hits": self._hits,
                "misses": self._misses,
                "stores": self._stores,
                "stored_bytes": self._store_bytes,
                "evictions": self._evictions,
                "evicted_bytes": self._evicted_bytes,
                "invalidations": self._invalidations,
                "last_tid": self._last_tid,
            }

    def _size_used(self) -> int:
        return self._bytes

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path or 'in memory'} {len(self)} records>"


def cache_path(
    cache: Any = None, client: str | None = None, var: str | None = None, storage: str = "1"
) -> str | None:
    """The cache file path ClientStorage should use (zeo-facts §6.3), or None for memory.

    ``cache`` given as a path wins; else with ``client``, ``<var or cwd>/<client>-<storage>.zec``.
    """
    if cache is not None:
        if isinstance(cache, (str, os.PathLike)):
            return os.fspath(cache)
        return None
    if client is not None:
        return os.path.join(var or os.getcwd(), f"{client}-{storage}.zec")
    return None


class CacheLockedError(zc.lockfile.LockError):
    """The cache file is already open in another process or ClientCache."""


# -- file format (see the module docstring) -------------------------------------------------------

MAGIC = b"ZNGCACHE"
VERSION = 1
_FILE_HEADER = struct.Struct(">8sII16s")  # magic, version, flags, index token; then crc32
DATA_START = 64  # the file header area; records start here
_CLEAN = 1

SCAN_CHUNK = 1 << 20  # bytes per read when scanning after a crash
SCAN_SKIP = 64 * 1024  # records bigger than this are jumped over, not read through

_REC = struct.Struct(">2sBBIQ8s8s8s8sII")  # marker .. data crc; then header crc32
HDR = _REC.size + 4  # 60
_MARK = b"zR"
KIND_DATA, KIND_INVAL, KIND_FORGET, KIND_TID, KIND_FREE = 1, 2, 3, 4, 5

INDEX_MAGIC = b"ZNGINDEX"
_INDEX_HEAD = struct.Struct(">8s16sQQQ8sQ")  # magic, token, head, filesize, next_seq, tid, n
_INDEX_ENTRY = struct.Struct(">8s8s8sQQII")  # oid, start, end, pos, seq, slot, dlen

_TRACE = struct.Struct(">dB3xI8s8s8s")  # time, code, data length, oid, tid, end tid: 40 bytes
TRACE_START = 0x00
TRACE_INVALIDATE_MISS = 0x10
TRACE_INVALIDATE_KEEP = 0x1C
TRACE_INVALIDATE_DISCARD = 0x1E
TRACE_LOAD_MISS = 0x20
TRACE_LOAD_HIT = 0x22
TRACE_LOAD_BEFORE_MISS = 0x24
TRACE_LOAD_BEFORE_HIT = 0x26
TRACE_STORE_CURRENT = 0x52
TRACE_STORE_NONCURRENT = 0x54

_crc32 = zlib.crc32


def _pack_record(
    kind: int, seq: int, slot: int, last_tid: bytes | None, oid: bytes, start: bytes,
    end: bytes | None, data: bytes,
) -> bytes:
    h = _REC.pack(
        _MARK, kind, 0, slot, seq, last_tid or z64, oid, start, end or z64, len(data),
        _crc32(data),
    )
    return h + _crc32(h).to_bytes(4, "big")


def _unpack_header(buf: bytes | memoryview) -> tuple | None:
    """The fields of a record header, or None if it is not a valid one."""
    if len(buf) < HDR or buf[:2] != _MARK:
        return None
    h = buf[: HDR - 4]
    if _crc32(h) != int.from_bytes(buf[HDR - 4 : HDR], "big"):
        return None
    return _REC.unpack(h)


class PersistentClientCache(ClientCache):
    """A ClientCache whose records live in a file (see the module docstring for the format)."""

    path: str

    def __init__(
        self, path: Any = None, size: int = 20 * 1024 * 1024, rearrange: float = 0.8
    ) -> None:
        self.path = os.fspath(path)
        self.maxsize = int(size)
        self.rearrange = rearrange
        self._lock = threading.RLock()
        self._init_state()
        self._ring: deque[_Record] = deque()
        self._fd = -1
        self._closed = False
        self._broken = False
        self._trace_file: Any = None
        self._rearranged = 0
        self._bad_records = 0
        self._set_aside = 0
        self._open_mode = ""
        self._open_scanned = 0
        self._open_bytes_read = 0
        try:
            self._lockfile = zc.lockfile.LockFile(self.path + ".lock")
        except zc.lockfile.LockError:
            raise CacheLockedError(
                f"ZEO cache file {self.path!r} is already in use "
                f"(another process or ClientCache holds {self.path + '.lock'!r})"
            ) from None
        try:
            self._open()
            if os.environ.get("ZEO_CACHE_TRACE"):
                self._trace_file = open(self.path + ".trace", "ab")
                self._trace(TRACE_START, z64, z64, None, 0)
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            self._lockfile.close()
            raise

    # -- opening ---------------------------------------------------------------------------------

    def _open(self) -> None:
        fd = self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        header = os.pread(fd, DATA_START, 0)
        self._open_bytes_read += len(header)
        if size == 0:
            self._open_mode = "new"
            self._start_empty()
        elif len(header) < DATA_START or not self._header_ok(header):
            logger.error("%s is not a valid cache file: set aside as %s.bad", self.path, self.path)
            os.close(fd)
            self._fd = -1
            os.replace(self.path, self.path + ".bad")
            self._set_aside += 1
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._open_mode = "rebuilt"
            self._start_empty()
        else:
            magic, version, flags, token = _FILE_HEADER.unpack_from(header)
            # Many new objects at once: keep the cyclic GC from rescanning them meanwhile.
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                if not (flags & _CLEAN and self._load_index(token, size)):
                    self._scan(size)
            finally:
                if gc_was_enabled:
                    gc.enable()
            if self._filesize > self.maxsize:
                logger.info("%s is bigger than the cache size now: emptying it", self.path)
                self._empty_file()
        self._remove_index()
        # From here on the file may change: the index is stale until the next close.
        self._write_header(0, bytes(16))
        os.fsync(self._fd)

    @staticmethod
    def _header_ok(header: bytes) -> bool:
        n = _FILE_HEADER.size
        if _crc32(header[:n]) != int.from_bytes(header[n : n + 4], "big"):
            return False
        magic, version, _, _ = _FILE_HEADER.unpack_from(header)
        return magic == MAGIC and version == VERSION

    def _write_header(self, flags: int, token: bytes) -> None:
        h = _FILE_HEADER.pack(MAGIC, VERSION, flags, token)
        h += _crc32(h).to_bytes(4, "big")
        os.pwrite(self._fd, h.ljust(DATA_START, b"\0"), 0)

    def _start_empty(self) -> None:
        self._write_header(0, bytes(16))
        os.ftruncate(self._fd, DATA_START)
        self._filesize = self._head = DATA_START
        self._next_seq = 1

    def _empty_file(self) -> None:
        """Drop every record, durably (so that none can come back after a crash)."""
        for r in self._ring:
            r.live = False
        self._ring.clear()
        self._reset_index()
        os.ftruncate(self._fd, DATA_START)
        os.fsync(self._fd)
        self._filesize = self._head = DATA_START
        # Skip a sequence number: a record of the old contents can never look contiguous.
        self._next_seq += 1

    def _remove_index(self) -> None:
        try:
            os.unlink(self.path + ".index")
        except FileNotFoundError:
            pass

    def _load_index(self, token: bytes, size: int) -> bool:
        """Load the index written by the last clean close; False if it is missing or stale."""
        try:
            with open(self.path + ".index", "rb") as f:
                raw = f.read()
        except OSError:
            return False
        self._open_bytes_read += len(raw)
        n = _INDEX_HEAD.size
        if len(raw) < n + 4 or _crc32(raw[:-4]) != int.from_bytes(raw[-4:], "big"):
            return False
        magic, itoken, head, filesize, next_seq, last_tid, count = _INDEX_HEAD.unpack_from(raw)
        if (
            magic != INDEX_MAGIC
            or itoken != token
            or filesize != size
            or len(raw) != n + count * _INDEX_ENTRY.size + 4
        ):
            return False
        # Paranoia: a record written after that close would sit at the head.
        if head + HDR <= size:
            buf = os.pread(self._fd, HDR, head)
            self._open_bytes_read += len(buf)
            h = _unpack_header(buf)
            if h is not None and h[1] != KIND_FREE and h[4] >= next_seq:
                return False
        ring = self._ring
        current = self._current
        noncurrent = self._noncurrent
        self._fill_from_index(raw[n:-4], ring, current, noncurrent)
        self._count = count
        self._head, self._filesize, self._next_seq = head, filesize, next_seq
        self._last_tid = None if last_tid == z64 else last_tid
        self._open_mode = "index"
        return True

    @staticmethod
    def _fill_from_index(raw: bytes, ring: deque, current: dict, noncurrent: dict) -> None:
        for oid, start, end, pos, seq, slot, dlen in _INDEX_ENTRY.iter_unpack(raw):
            if end == z64:
                r = current[oid] = _Record(oid, start, None, None, pos, seq, slot, dlen)
            else:
                r = _Record(oid, start, end, None, pos, seq, slot, dlen)
                lst = noncurrent.get(oid)
                if lst is None:
                    noncurrent[oid] = [r]
                else:
                    lst.append(r)
                    lst.sort(key=_start_of)
            ring.append(r)

    def _scan(self, size: int) -> None:
        """Rebuild the index from the record headers (data is checked at load, not here).

        Headers are parsed from sequential reads of ``SCAN_CHUNK`` bytes (one big read beats
        many small ones, on a cold disk above all); after a record bigger than
        ``SCAN_SKIP`` the scan jumps to the next header and reads one page there.
        """
        fd = self._fd
        pos = DATA_START
        recs = []
        buf = memoryview(b"")
        buf_start = pos
        slot = 0
        while pos + HDR <= size:
            off = pos - buf_start
            if off + HDR > len(buf):
                want = 4096 if slot > SCAN_SKIP else SCAN_CHUNK
                buf = memoryview(os.pread(fd, min(want, size - pos), pos))
                self._open_bytes_read += len(buf)
                buf_start, off = pos, 0
            self._open_scanned += 1
            h = _unpack_header(buf[off : off + HDR])
            if h is None:
                break
            kind, slot, dlen = h[1], h[3], h[9]
            if slot < HDR or pos + slot > size or kind > KIND_FREE or HDR + dlen > slot:
                break
            if kind != KIND_FREE:
                recs.append((h[4], pos, h))
            pos += slot
        if pos < size:
            logger.warning("%s: dropping unreadable cache records from offset %d", self.path, pos)
            os.ftruncate(fd, pos)
        self._filesize = pos
        self._next_seq = 1
        self._head = DATA_START
        self._open_mode = "scan"
        if not recs:
            return
        # Keep the newest run of consecutive sequence numbers: a record lost to a crash
        # (torn, or never reached the disk) ends the run, and everything older is dropped,
        # so the state is exactly that after some prefix of the writes.
        recs.sort()
        i = len(recs) - 1
        while i > 0 and recs[i - 1][0] == recs[i][0] - 1:
            i -= 1
        seq, pos, h = recs[-1]
        self._next_seq = seq + 1
        self._head = head = pos + h[3]
        last_tid = h[5]
        self._last_tid = None if last_tid == z64 else last_tid
        data_recs = []
        for seq, pos, h in recs[i:]:
            kind, oid = h[1], h[6]
            if kind == KIND_DATA:
                end = h[8]
                r = _Record(oid, h[7], None if end == z64 else end, None, pos, seq, h[3], h[9])
                data_recs.append(r)
                self._apply_data(r)
            elif kind == KIND_INVAL:
                cur = self._current.get(oid)
                if cur is not None and cur.start != h[8]:
                    self._apply_invalidate(cur, h[8])
            elif kind == KIND_FORGET:
                self._apply_forget(oid)
        # The ring runs from the head: the older lap after it, then the newer one.
        data_recs.sort(key=lambda r: (r.pos < head, r.pos))
        self._ring.extend(data_recs)

    # -- writing -----------------------------------------------------------------------------------

    def _evict_record(self, r: _Record) -> None:
        if r.live:
            self._unlink(r)
            self._evictions += 1
            self._evicted_bytes += r.dlen

    def _append(
        self, kind: int, oid: bytes, start: bytes, end: bytes | None, data: bytes
    ) -> tuple[int, int, int] | None:
        """Write one record at the head; ``(pos, seq, slot)``, or None if it cannot be kept.

        Evicts the records the new one overwrites.  On an I/O error the cache turns itself
        off (see ``_fail``) and returns None.
        """
        n = HDR + len(data)
        cap = self.maxsize
        if n > cap - DATA_START or self._broken or self._fd < 0:
            return None
        ring = self._ring
        try:
            h = self._head
            if h + n > cap:
                # Wrap.  What lies after the head is the oldest part of the ring: drop it.
                while ring and ring[0].pos >= h:
                    self._evict_record(ring.popleft())
                if h < self._filesize:
                    os.ftruncate(self._fd, h)
                    self._filesize = h
                h = DATA_START
            end_pos = h + n
            while ring and h <= ring[0].pos < end_pos:
                self._evict_record(ring.popleft())
            if ring and ring[0].pos >= h:
                boundary = ring[0].pos
            else:
                boundary = self._filesize
            gap = boundary - end_pos
            seq = self._next_seq
            self._next_seq = seq + 1
            if gap >= HDR:
                slot = n
                free = _pack_record(KIND_FREE, 0, gap, None, z64, z64, None, b"")
                buf = _pack_record(kind, seq, slot, self._last_tid, oid, start, end, data)
                os.pwrite(self._fd, b"".join((buf, data, free)), h)
            else:
                slot = n + gap if gap > 0 else n
                buf = _pack_record(kind, seq, slot, self._last_tid, oid, start, end, data)
                os.pwrite(self._fd, buf + data, h)
            self._head = h + slot
            if self._head > self._filesize:
                self._filesize = self._head
            return h, seq, slot
        except OSError as e:
            self._fail(e)
            return None

    def _fail(self, exc: BaseException) -> None:
        """An I/O error: empty the file if we can, forget everything, stop caching."""
        logger.error("ZEO cache %s: I/O error, caching turned off: %s", self.path, exc)
        self._broken = True
        for r in self._ring:
            r.live = False
        self._ring.clear()
        last_tid = self._last_tid
        self._reset_index()
        self._last_tid = last_tid  # still true for the (now empty) cache
        try:
            os.ftruncate(self._fd, DATA_START)
            os.fsync(self._fd)
        except OSError:
            try:
                os.unlink(self.path)
            except OSError:
                logger.critical("ZEO cache %s could not be emptied: remove it", self.path)

    def _apply_data(self, r: _Record) -> None:
        """Index a data record read back from the file (replay or rewrite)."""
        oid, start = r.oid, r.start
        if r.end is None:
            cur = self._current.get(oid)
            if cur is not None:
                if cur.start == start:
                    self._replace(cur, r)
                    return
                if cur.start > start:
                    r.live = False
                    return
                self._unlink(cur)
            self._current[oid] = r
            self._count += 1
        else:
            old = self._noncurrent_at(oid, start)
            if old is not None:
                self._replace(old, r)
                return
            cur = self._current.get(oid)
            if cur is not None and cur.start == start:
                r.live = False
                return
            self._add_noncurrent(r)

    def _drop(self, r: _Record) -> None:
        self._unlink(r)

    def _read(self, r: _Record) -> bytes | None:
        """The data of ``r``, checked against its header and checksum; None if damaged."""
        if self._fd < 0:
            return None
        try:
            buf = os.pread(self._fd, HDR + r.dlen, r.pos)
        except OSError as e:
            self._fail(e)
            return None
        # The header checksum is not recomputed here: the fields that matter are compared
        # with the index (the sequence number makes an overwritten slot fail) and the data
        # is checked against its own checksum.
        if len(buf) == HDR + r.dlen:
            h = _REC.unpack_from(buf)
            if (
                h[4] == r.seq
                and h[6] == r.oid
                and h[7] == r.start
                and h[1] == KIND_DATA
                and h[0] == _MARK
                and h[9] == r.dlen
            ):
                data = buf[HDR:]
                if _crc32(data) == h[10]:
                    return data
        self._bad_records += 1
        logger.warning("ZEO cache %s: damaged record for oid %r dropped", self.path, r.oid)
        # Forget the oid, in the file too: the record must not come back on reopen.
        if self._append(KIND_FORGET, r.oid, z64, None, b"") is not None:
            self._apply_forget(r.oid)
        return None

    def _maybe_rearrange(self, r: _Record, data: bytes) -> None:
        """Copy a record that is about to be overwritten to the head (it is in use)."""
        head = self._head
        pos = r.pos
        age = head - pos if pos < head else head - DATA_START + self._filesize - pos
        if age > self.rearrange * (self.maxsize - DATA_START):
            w = self._append(KIND_DATA, r.oid, r.start, r.end, data)
            if w is not None:
                r2 = _Record(r.oid, r.start, r.end, None, *w, r.dlen)
                self._ring.append(r2)
                self._apply_data(r2)
                self._rearranged += 1

    def _trace(self, code: int, oid: bytes, tid: bytes | None, end: bytes | None, dlen: int):
        self._trace_file.write(_TRACE.pack(time.time(), code, dlen, oid, tid or z64, end or z64))

    # -- the API ----------------------------------------------------------------------------------

    def load(self, oid: bytes) -> tuple[bytes, bytes] | None:
        with self._lock:
            r = self._current.get(oid)
            data = None if r is None else self._read(r)
            if r is None or data is None:
                self._misses += 1
                if self._trace_file is not None:
                    self._trace(TRACE_LOAD_MISS, oid, None, None, 0)
                return None
            self._hits += 1
            if self._trace_file is not None:
                self._trace(TRACE_LOAD_HIT, oid, r.start, None, r.dlen)
            start = r.start
            self._maybe_rearrange(r, data)
            return data, start

    def loadBefore(self, oid: bytes, before_tid: bytes) -> tuple[bytes, bytes, bytes | None] | None:
        with self._lock:
            r = self._current.get(oid)
            if r is None or r.start >= before_tid:
                r = self._find_noncurrent(oid, before_tid)
            data = None if r is None else self._read(r)
            if r is None or data is None:
                self._misses += 1
                if self._trace_file is not None:
                    self._trace(TRACE_LOAD_BEFORE_MISS, oid, before_tid, None, 0)
                return None
            self._hits += 1
            start, end = r.start, r.end
            if self._trace_file is not None:
                code = TRACE_LOAD_HIT if end is None else TRACE_LOAD_BEFORE_HIT
                self._trace(code, oid, start, end, r.dlen)
            self._maybe_rearrange(r, data)
            return data, start, end

    def store(self, oid: bytes, start_tid: bytes, end_tid: bytes | None, data: bytes) -> None:
        with self._lock:
            if end_tid is not None and end_tid <= start_tid:
                raise ValueError(f"end_tid {end_tid!r} <= start_tid {start_tid!r}")
            if HDR + len(data) > self.maxsize - DATA_START:
                # Too big to keep; but a current record it supersedes must go, in the file too.
                cur = self._current.get(oid) if end_tid is None else None
                if cur is not None and cur.start < start_tid:
                    if self._append(KIND_FORGET, oid, z64, None, b"") is not None:
                        self._apply_forget(oid)
                return
            if not self._accept(oid, start_tid, end_tid):
                return
            w = self._append(KIND_DATA, oid, start_tid, end_tid, data)
            if w is None:
                return
            r = _Record(oid, start_tid, end_tid, None, *w, len(data))
            self._ring.append(r)
            if end_tid is None:
                self._current[oid] = r
                self._count += 1
            else:
                self._add_noncurrent(r)
            self._stores += 1
            self._store_bytes += len(data)
            if self._trace_file is not None:
                code = TRACE_STORE_CURRENT if end_tid is None else TRACE_STORE_NONCURRENT
                self._trace(code, oid, start_tid, end_tid, len(data))

    def invalidate(self, oid: bytes, tid: bytes | None) -> None:
        with self._lock:
            self._invalidations += 1
            tracing = self._trace_file is not None
            if tid is None:
                if oid in self._current or oid in self._noncurrent:
                    if self._append(KIND_FORGET, oid, z64, None, b"") is not None:
                        self._apply_forget(oid)
                    if tracing:
                        self._trace(TRACE_INVALIDATE_DISCARD, oid, None, None, 0)
                elif tracing:
                    self._trace(TRACE_INVALIDATE_MISS, oid, None, None, 0)
                return
            cur = self._current.get(oid)
            if cur is None:
                if tracing:
                    self._trace(TRACE_INVALIDATE_MISS, oid, tid, None, 0)
                return
            if cur.start == tid:
                # Normal: a load read after the commit reached the server before its
                # invalidation was written (zeo-facts §4.4); the record is already current.
                logger.debug("invalidation of %r with the tid of its current record", oid)
                return
            start = cur.start
            if self._append(KIND_INVAL, oid, start, tid, b"") is not None:
                # Making room at the head may have evicted the record itself.
                if cur.live:
                    self._apply_invalidate(cur, tid)
            if tracing:
                self._trace(TRACE_INVALIDATE_KEEP, oid, start, tid, 0)

    def setLastTid(self, tid: bytes | None) -> None:
        """As ClientCache.setLastTid; the new tid is written to the file at once."""
        if tid is None or tid == z64:
            return
        with self._lock:
            last = self._last_tid
            if tid == last:
                return
            ClientCache.setLastTid(self, tid)
            # The tid travels in the header of every record written from now on.
            self._append(KIND_TID, z64, z64, None, b"")

    def clear(self) -> None:
        with self._lock:
            if self._broken or self._closed:
                self._reset_index()
                return
            try:
                self._empty_file()
            except OSError as e:
                self._fail(e)

    def close(self) -> None:
        """Write the index (so that the next open need not scan), then release the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self._broken:
                    self._write_index()
            except OSError as e:
                logger.error("ZEO cache %s: could not write its index: %s", self.path, e)
            finally:
                os.close(self._fd)
                self._fd = -1
                if self._trace_file is not None:
                    self._trace_file.close()
                    self._trace_file = None
                self._lockfile.close()

    def _write_index(self) -> None:
        token = os.urandom(16)
        live = [r for r in self._ring if r.live]
        parts = [
            _INDEX_HEAD.pack(
                INDEX_MAGIC, token, self._head, self._filesize, self._next_seq,
                self._last_tid or z64, len(live),
            )
        ]
        pack = _INDEX_ENTRY.pack
        parts.extend(
            pack(r.oid, r.start, r.end or z64, r.pos, r.seq, r.slot, r.dlen) for r in live
        )
        raw = b"".join(parts)
        raw += _crc32(raw).to_bytes(4, "big")
        tmp = self.path + ".index.tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path + ".index")
        os.fsync(self._fd)
        self._write_header(_CLEAN, token)
        os.fsync(self._fd)

    def contents(self) -> Iterator[tuple[bytes, bytes]]:
        return ClientCache.contents(self)

    def _size_used(self) -> int:
        return self._filesize - DATA_START

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            s = ClientCache.statistics(self)
            s.update(
                file_size=self._filesize,
                head=self._head,
                open_mode=self._open_mode,
                open_records_scanned=self._open_scanned,
                open_bytes_read=self._open_bytes_read,
                bad_records=self._bad_records,
                set_aside=self._set_aside,
                rearranged=self._rearranged,
                broken=self._broken,
                tracing=self._trace_file is not None,
            )
            return s
