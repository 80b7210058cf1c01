"""The cold-load path of a client storage: what a cache miss fetches, and what it fetches ahead.

:class:`Prefetcher` owns the policy that :mod:`ZEO.client.readahead` computes: loads of
consecutive oids read ahead (:class:`~ZEO.client.readahead.ReadAhead`), a cold load of a
current record also fetches the uncached objects it references, scaled by how many of those
get used (:class:`~ZEO.client.readahead.PrefetchFeedback`), and a load of an object that was
fetched ahead earns the next step.  Everything it requests is pipelined on the connection and
stored in the cache by the connection's reader thread, in the server's order.

A :class:`~ZEO.client.storage.ClientStorage` asks it twice at most per load:
:meth:`Prefetcher.loading` before looking in the cache (every load), and
:meth:`Prefetcher.fetch` on a miss.  Thread-safe: API threads call it, and reply hooks run
on the reader thread.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterable
from typing import Any

from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf

from ZEO.Exceptions import ClientDisconnected

from .cache import ClientCache
from .connection import Call, Connection
from .readahead import PrefetchFeedback, ReadAhead

logger = logging.getLogger("ZEO.ClientStorage")

MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"

# A record without the opcode of a persistent reference references nothing: BINPERSID for
# protocol 1 and up (ZODB's; a protocol 2+ pickle starts with PROTO), PERSID for protocol 0.
_BINPERSID, _PERSID, _PROTO = pickle.BINPERSID, pickle.PERSID, pickle.PROTO

#: How many oids whose record was found to reference nothing are remembered, so that their
#: next loads skip the scan (it unpickles the whole record: ~27 ns a byte, 3.5 ms for a
#: 130 KB list, on the path of the load that triggered it), and after how many skipped
#: loads an oid is scanned again (its class may start holding references).
NO_REFERENCES_MEMO = 4096
NO_REFERENCES_SKIPS = 64


class Prefetcher:
    """Cold loads of one client storage, and the fetching ahead they trigger.

    :param cache: the storage's cache; every reply is stored in it.
    :param connection: returns the current connection, or None while disconnected.
    :param prefetch_references: uncached objects a cold load's record refers to that are
        fetched along with it (0: off).
    :param read_ahead: the largest read-ahead window (0: off).
    """

    def __init__(self, cache: ClientCache, connection: Callable[[], Connection | None],
                 prefetch_references: int = 32, read_ahead: int = 64) -> None:
        self.cache = cache
        self._connection = connection
        self.prefetch_references = max(0, int(prefetch_references))
        self.feedback = PrefetchFeedback() if self.prefetch_references else None
        self.read_ahead = ReadAhead(int(read_ahead)) if int(read_ahead) > 0 else None
        self._no_references: dict[bytes, int] = {}  # oid -> loads that skipped its scan
        self.reference_scans = 0
        self.scans_skipped = 0

    # -- the two questions a load asks -------------------------------------------------

    def loading(self, oid: bytes) -> None:
        """A load of ``oid`` starts (cached or not): count a use of what was fetched ahead,
        and keep the read-ahead a window in front of a sequential reader."""
        feedback = self.feedback
        if feedback is not None:
            sibling = feedback.used(oid)
            if sibling is not None:
                self._used_ahead(oid, sibling)
        ahead = self.read_ahead
        if ahead is not None and oid == ahead.mark:
            oids = ahead.reached(oid)
            conn = self._connection()
            if oids and conn is not None:
                self._fetch_ahead(conn, oids)

    def fetch(self, conn: Connection, oid: bytes, tid: bytes) -> Any:
        """``loadBefore(oid, tid)`` on a cache miss: the record, or None.

        A current record already requested (fetched ahead) is waited for rather than asked
        again; otherwise the request goes out, followed by any read-ahead the miss triggers.
        """
        prefetching = conn.pending((oid, MAXTID)) if tid != MAXTID else None
        fetched_ahead = prefetching is not None
        if prefetching is not None:
            try:
                prefetching.wait()
            except Exception:
                pass  # fall back to a load of our own
            finally:
                del prefetching  # no cycle through an error's traceback (see Call.wait)
            r = self.cache.loadBefore(oid, tid)
            if r is not None:
                return r
        call = self.request(conn, oid, tid)
        ahead = self.read_ahead
        if ahead is not None and not fetched_ahead:
            oids = ahead.miss(oid)
            if oids:
                self._fetch_ahead(conn, oids)
        try:
            return call.wait()
        finally:
            del call

    def request(self, conn: Connection, oid: bytes, tid: bytes) -> Call:
        """Send ``loadBefore(oid, tid)``; its reply is cached and, for a current record,
        its references fetched ahead."""
        after = self._references_hook(conn, oid) if self.prefetch_references else None
        return conn.call("loadBefore", oid, tid, msgid=(oid, tid),
                         on_reply=self._store_hook(oid), after_reply=after)

    def prefetch(self, conn: Connection, oids: Iterable[bytes], tid: bytes) -> None:
        """ZODB's ``prefetch``: request each uncached oid without waiting."""
        for oid in oids:
            if self.cache.loadBefore(oid, tid) is None:
                self.request(conn, oid, tid)

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.read_ahead is not None:
            stats["read_ahead"] = self.read_ahead.statistics()
        if self.feedback is not None:
            stats["prefetch_references"] = dict(self.feedback.statistics(),
                                                scans=self.reference_scans,
                                                scans_skipped=self.scans_skipped)
        return stats

    # -- reply hooks (reader thread) ---------------------------------------------------

    def _store_hook(self, oid: bytes) -> Callable[[Any], Any]:
        cache = self.cache
        ahead = self.read_ahead

        def store_in_cache(result: Any) -> Any:
            if result is not None:
                data, start, end = result
                if ahead is not None:
                    ahead.observe_size(len(data))
                try:
                    cache.store(oid, start, end, data)
                except Exception:
                    logger.exception("caching %r failed", oid)
            return result

        return store_in_cache

    def _references_hook(self, conn: Connection, oid: bytes) -> Callable[[Any], None]:
        def prefetch_references(result: Any) -> None:  # reader thread, caller already woken
            if result is not None and result[2] is None:
                # Only a current record says what is current to fetch.
                self._fetch_references(conn, oid, result[0])

        return prefetch_references

    # -- fetching ahead ----------------------------------------------------------------

    def _fetch_references(self, conn: Connection, oid: bytes, data: bytes) -> bool:
        """Request, pipelined, the uncached objects ``data`` (``oid``'s record) references,
        as many as useful.

        False when the record references nothing.
        """
        if _BINPERSID not in data and (data[:1] == _PROTO or _PERSID not in data):
            return False  # no persistent reference can be in it: skip the unpickling
        no_references = self._no_references
        skipped = no_references.get(oid)
        if skipped is not None:
            self.scans_skipped += 1
            if skipped >= NO_REFERENCES_SKIPS:
                no_references.pop(oid, None)
            else:
                no_references[oid] = skipped + 1
            return False
        feedback = self.feedback
        assert feedback is not None
        limit = feedback.limit(self.prefetch_references)
        if not limit:
            return True
        self.reference_scans += 1
        try:
            refs = referencesf(data)
        except Exception:
            return False  # not a plain ZODB record (e.g. transformed data): nothing to do
        if not refs:
            self._remember_no_references(oid)
            return False
        cache = self.cache
        calls = []
        for ref in dict.fromkeys(refs):
            if cache.load(ref) is None:
                calls.append(((ref, MAXTID), (ref, MAXTID), self._store_hook(ref)))
                if len(calls) >= limit:
                    break
        if calls:
            feedback.issued([c[0][0] for c in calls])
            try:
                conn.call_many("loadBefore", calls)
            except ClientDisconnected:
                pass
        return True

    def _remember_no_references(self, oid: bytes) -> None:
        no_references = self._no_references
        no_references[oid] = 0
        if len(no_references) > NO_REFERENCES_MEMO:
            try:  # the oldest first; API threads and the reader may both be here
                del no_references[next(iter(no_references))]
            except (KeyError, RuntimeError, StopIteration):
                pass

    def _used_ahead(self, oid: bytes, sibling: bytes) -> None:
        """``oid`` was fetched ahead and is now wanted: fetch ahead what it and ``sibling``
        (requested after it, b"" if none) reference in turn.

        A record fetched ahead brings no references of its own (that would cascade through
        the whole database); the application's use of it is what earns the next step.  The
        sibling's references go too, so a traversal (bucket after bucket) never waits for
        the first object of the next one.
        """
        conn = self._connection()
        if conn is None:
            return
        ahead = self.read_ahead
        if ahead is not None:
            # To the read-ahead a use of what was fetched ahead is a miss avoided, not a hit:
            # objects written together and read in order still form a sequence to detect.
            oids = ahead.miss(oid)
            if oids:
                self._fetch_ahead(conn, oids)
        hit = self.cache.load(oid)
        if hit is None or not self._fetch_references(conn, oid, hit[0]) or not sibling:
            return  # a leaf's siblings are leaves too, as a rule
        hit = self.cache.load(sibling)
        if hit is not None:
            self._fetch_references(conn, sibling, hit[0])

    def _fetch_ahead(self, conn: Connection, oids: range) -> None:
        cache = self.cache
        calls = []
        for n in oids:
            oid = n.to_bytes(8, "big")
            if cache.load(oid) is None:
                calls.append(((oid, MAXTID), (oid, MAXTID), self._store_hook(oid)))
        if calls:
            try:
                conn.call_many("loadBefore", calls, self._fetched_ahead_error)
            except ClientDisconnected:
                pass

    def _fetched_ahead_error(self, msgid: Any, exc: BaseException) -> None:
        if isinstance(exc, POSKeyError) and self.read_ahead is not None:
            self.read_ahead.missing(msgid[0])
