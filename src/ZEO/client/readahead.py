"""Sequential read-ahead for cold loads: which oids to fetch before they are asked for.

Objects written together get consecutive oids, and applications often read them back in that
order (a migration, an export, a catalog rebuild, ``storage.load`` in a loop).  One round trip
per object then dominates.  :class:`ReadAhead` watches the cache misses and, once it has seen
``trigger`` consecutive oids, answers with a window of the oids that follow, to be requested
pipelined (current records, like any prefetch).  The window doubles up to ``max_window`` while
the pattern holds; a load of :attr:`ReadAhead.mark` (the first oid of the newest window) asks
for the next one, so the requests stay a window ahead of the reader.  Any other miss starts
over.  Like the Linux page cache's read-ahead, its cost when the guess is wrong is bounded:
at most one window of unneeded loads per broken sequence.

No I/O here: oids go in as 8-byte big-endian ``bytes`` and windows come out as ranges of
ints.  Thread-safe.
"""

from __future__ import annotations

import threading

_NOTHING = range(0)
_OID_LIMIT = 1 << 64


class ReadAhead:
    """Read-ahead state of one client storage.

    :meth:`miss` is told about every load that the cache could not serve; :meth:`reached`
    about a load of :attr:`mark`.  Both return the oids to request now (often none).
    """

    def __init__(self, max_window: int = 64, min_window: int = 8, trigger: int = 3,
                 byte_budget: int = 4 << 20) -> None:
        if max_window < 1 or min_window < 1 or trigger < 1 or byte_budget < 1:
            raise ValueError("read-ahead windows, trigger and byte budget must be positive")
        self.max_window = max_window
        # A window asks for about this many bytes at most, judged by the records seen lately:
        # reading ahead 64 records of 1 MiB would fill both ends' memory for nothing.
        self.byte_budget = byte_budget
        self._record_size = 0.0  # moving average of the sizes passed to observe_size()
        self.min_window = min(min_window, max_window)
        self.trigger = trigger
        self.mark: bytes | None = None
        self._lock = threading.Lock()
        self._expected = -1  # the oid after the last miss
        self._run = 0  # consecutive sequential misses
        self._window = self.min_window
        self._start = -1  # first oid requested ahead in this run
        self._end = -1  # last oid requested ahead
        self.windows = 0
        self.requested = 0
        self.stopped = 0

    def miss(self, key: bytes) -> range:
        """A cold load of ``key``: the oids to fetch ahead, if the pattern is sequential."""
        oid = int.from_bytes(key, "big")
        with self._lock:
            if self._run and self._start <= oid <= self._end:
                self._run += 1  # requested already (its reply is on its way)
                self._expected = oid + 1
                return _NOTHING
            if oid == self._expected or (self._run and oid == self._end + 1):
                self._run += 1
            else:
                self._run = 1
                self._window = self.min_window
                self._start = self._end = -1
                self.mark = None
            self._expected = oid + 1
            if self._run < self.trigger:
                return _NOTHING
            return self._advance(oid)

    def reached(self, key: bytes) -> range:
        """A load of :attr:`mark`: the next window."""
        with self._lock:
            if key != self.mark:
                return _NOTHING  # another thread got there first
            return self._advance(int.from_bytes(key, "big"))

    def missing(self, key: bytes) -> None:
        """An oid fetched ahead does not exist (the end of the database): stop this run."""
        oid = int.from_bytes(key, "big")
        with self._lock:
            if self._run and self._start <= oid <= self._end:
                self._run = 0
                self._start = self._end = -1
                self._window = self.min_window
                self.mark = None
                self.stopped += 1

    def observe_size(self, nbytes: int) -> None:
        """The size of a record just loaded (any load: it sizes the next windows)."""
        # Unlocked: a lost update only nudges an estimate.
        avg = self._record_size
        self._record_size = nbytes if avg == 0.0 else avg + (nbytes - avg) / 8

    def _advance(self, oid: int) -> range:
        start = max(self._end, oid) + 1
        count = self._window
        if self._record_size > 0.0:
            count = max(1, min(count, int(self.byte_budget // self._record_size)))
        ahead = range(start, min(start + count, _OID_LIMIT))
        if not ahead:
            return _NOTHING
        self._window = min(self._window * 2, self.max_window)
        if self._start < 0:
            self._start = start
        self._end = ahead[-1]
        self._expected = self._end + 1
        self.mark = start.to_bytes(8, "big")
        self.windows += 1
        self.requested += len(ahead)
        return ahead

    def statistics(self) -> dict[str, int]:
        return {"windows": self.windows, "requested": self.requested,
                "stopped": self.stopped, "max_window": self.max_window,
                "record_size": int(self._record_size)}
