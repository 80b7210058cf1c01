"""Speculative fetching for cold loads: which oids to fetch before they are asked for.

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


class PrefetchFeedback:
    """How useful the references fetched ahead have been lately, and so how many to fetch.

    Fetching the objects a record references pays off in a traversal and is pure waste in
    random access (a BTree bucket names dozens of values; a random read wants one), where it
    costs the server, which every client shares, reads for nothing.  :meth:`issued` is told
    the oids fetched ahead, :meth:`used` about every load.  An oid is judged *used* when the
    application loads it within ``horizon`` loads of its request, *wasted* otherwise.
    :meth:`used` answers with the oid requested after it in the same batch (its next
    sibling), so the caller can stay one record ahead in a traversal.  A moving
    average of those verdicts scales :meth:`limit`: the full count while at least half are
    used, proportionally less down to none at a quarter, and while it is none every
    ``probe``-th record still fetches one reference, so a traversal that starts later is
    noticed.

    No I/O.  Thread-safe.
    """

    def __init__(self, horizon: int = 256, weight: int = 32, probe: int = 16,
                 capacity: int = 4096) -> None:
        if min(horizon, weight, probe, capacity) < 1:
            raise ValueError("horizon, weight, probe and capacity must be positive")
        self.horizon = horizon
        self._alpha = 1.0 / weight
        self._probe = probe
        self._capacity = capacity
        self._lock = threading.Lock()
        self._calls = 0
        self._loads = 0  # loads seen while something was outstanding: the clock of verdicts
        # oid -> (self._loads when requested, the next oid of its batch or b"")
        self._outstanding: dict[bytes, tuple[int, bytes]] = {}
        self.score = 1.0  # moving average of used (1) / wasted (0); optimistic at first
        self.issued_count = 0
        self.used_count = 0
        self.wasted_count = 0

    def limit(self, maximum: int) -> int:
        """How many references of the record just loaded to fetch ahead, at most ``maximum``."""
        score = self.score
        # A wasted fetch costs the server about what a used one saves the client.
        n = min(maximum, int(maximum * (score - 0.25) * 4.0)) if score > 0.25 else 0
        if n == 0:
            self._calls += 1  # unlocked: a lost increment only shifts a probe
            if self._calls % self._probe == 0:
                return min(1, maximum)
        return n

    def issued(self, oids: list[bytes]) -> None:
        """These oids were just requested ahead of use."""
        with self._lock:
            outstanding = self._outstanding
            stamp = self._loads
            for oid, after in zip(oids, [*oids[1:], b""]):
                outstanding[oid] = (stamp, after)
            self.issued_count += len(oids)
            self._judge()

    def used(self, oid: bytes) -> bytes | None:
        """``oid`` is being loaded by the application.

        If it was fetched ahead (it is judged used now), the oid requested after it in the
        same batch (``b""`` for the last); else None.
        """
        if not self._outstanding:
            return None  # the common case, without the lock
        with self._lock:
            self._loads += 1
            entry = self._outstanding.pop(oid, None)
            if entry is not None:
                self.used_count += 1
                self.score += self._alpha * (1.0 - self.score)
            self._judge()
            return None if entry is None else entry[1]

    def _judge(self) -> None:
        outstanding = self._outstanding
        oldest = self._loads - self.horizon
        while outstanding:
            oid, (stamp, _) = next(iter(outstanding.items()))
            if stamp >= oldest and len(outstanding) <= self._capacity:
                break
            del outstanding[oid]
            self.wasted_count += 1
            self.score -= self._alpha * self.score

    def statistics(self) -> dict[str, float]:
        return {"issued": self.issued_count, "used": self.used_count,
                "wasted": self.wasted_count, "score": round(self.score, 3)}
