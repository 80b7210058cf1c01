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

Thread safety: every public method holds ``self._lock`` (an ``RLock``).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from operator import attrgetter
from typing import Any

__all__ = ["ClientCache", "RECORD_OVERHEAD", "cache_path"]

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

    def __init__(self, oid: bytes, start: bytes, end: bytes | None, data: bytes | None) -> None:
        self.oid = oid
        self.start = start
        self.end = end
        self.data = data
        self.pos = 0
        self.seq = 0
        self.slot = 0
        self.dlen = 0 if data is None else len(data)
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
        self._current: dict[bytes, _Record] = {}
        self._noncurrent: dict[bytes, list[_Record]] = {}
        self._last_tid: bytes | None = None
        self._count = 0
        # statistics
        self._hits = 0
        self._misses = 0
        self._stores = 0
        self._store_bytes = 0
        self._evictions = 0
        self._evicted_bytes = 0
        self._invalidations = 0

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
                cur = self._current.get(oid)
                if cur is not None:
                    self._drop(cur)
                for r in list(self._noncurrent.get(oid, ())):
                    self._drop(r)
                return
            cur = self._current.get(oid)
            if cur is None:
                return
            if cur.start == tid:
                logger.warning("invalidation of %r with the tid of its current record", oid)
                return
            if cur.start > tid:
                self._drop(cur)
                return
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
    import os

    if cache is not None:
        if isinstance(cache, (str, os.PathLike)):
            return os.fspath(cache)
        return None
    if client is not None:
        return os.path.join(var or os.getcwd(), f"{client}-{storage}.zec")
    return None


class PersistentClientCache(ClientCache):
    """Placeholder until the file-backed cache lands: behaves as the in-memory cache."""

    def __init__(
        self, path: Any = None, size: int = 20 * 1024 * 1024, rearrange: float = 0.8
    ) -> None:
        super().__init__(None, size, rearrange)
        self.path = str(path)
