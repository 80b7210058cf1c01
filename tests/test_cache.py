"""Unit tests of the ClientCache API (in memory and persistent), LRU eviction, ``cache_path``."""

from __future__ import annotations

import os
import threading

import pytest

from ZEO.client.cache import RECORD_OVERHEAD, ClientCache, cache_path


def p64(n: int) -> bytes:
    return n.to_bytes(8, "big")


OID = p64(1)


@pytest.fixture(params=["memory", "file"])
def cache(request, tmp_path):
    """The API tests run on both the in-memory and the persistent cache."""
    path = None if request.param == "memory" else str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    yield c
    c.close()


def test_store_load_current(cache):
    assert cache.load(OID) is None
    cache.store(OID, p64(5), None, b"five")
    assert cache.load(OID) == (b"five", p64(5))
    assert len(cache) == 1
    assert list(cache.contents()) == [(OID, p64(5))]
    assert cache.maxsize == 1 << 20


def test_memory_cache_has_no_path():
    c = ClientCache(size=1000)
    assert c.path is None and c.maxsize == 1000


def test_load_before(cache):
    cache.store(OID, p64(5), p64(9), b"five")
    cache.store(OID, p64(9), None, b"nine")
    cache.store(OID, p64(2), p64(5), b"two")
    assert cache.loadBefore(OID, p64(2)) is None
    assert cache.loadBefore(OID, p64(3)) == (b"two", p64(2), p64(5))
    assert cache.loadBefore(OID, p64(5)) == (b"two", p64(2), p64(5))
    assert cache.loadBefore(OID, p64(6)) == (b"five", p64(5), p64(9))
    assert cache.loadBefore(OID, p64(9)) == (b"five", p64(5), p64(9))
    assert cache.loadBefore(OID, p64(10)) == (b"nine", p64(9), None)
    assert cache.loadBefore(p64(2), p64(10)) is None
    # load only returns the current record
    assert cache.load(OID) == (b"nine", p64(9))


def test_load_before_gap_between_noncurrent(cache):
    cache.store(OID, p64(2), p64(4), b"a")
    cache.store(OID, p64(6), p64(8), b"b")
    assert cache.loadBefore(OID, p64(5)) is None  # revision 4..6 unknown
    assert cache.loadBefore(OID, p64(6)) is None
    assert cache.loadBefore(OID, p64(7)) == (b"b", p64(6), p64(8))
    assert cache.loadBefore(OID, p64(9)) is None
    assert cache.load(OID) is None


def test_store_duplicates_and_older_current(cache):
    cache.store(OID, p64(5), None, b"five")
    cache.store(OID, p64(5), None, b"other")  # duplicate: ignored
    cache.store(OID, p64(3), None, b"three")  # older than cached current: ignored
    assert cache.load(OID) == (b"five", p64(5))
    cache.store(OID, p64(7), None, b"seven")  # newer: replaces
    assert cache.load(OID) == (b"seven", p64(7))
    assert len(cache) == 1
    cache.store(OID, p64(1), p64(3), b"one")
    cache.store(OID, p64(1), p64(3), b"again")
    assert cache.loadBefore(OID, p64(2)) == (b"one", p64(1), p64(3))
    assert len(cache) == 2
    with pytest.raises(ValueError):
        cache.store(OID, p64(4), p64(4), b"bad")


def test_invalidate(cache):
    cache.store(OID, p64(5), None, b"five")
    cache.invalidate(OID, p64(5))  # same tid as the current record: ignored
    assert cache.load(OID) == (b"five", p64(5))
    cache.invalidate(OID, p64(8))
    assert cache.load(OID) is None
    assert cache.loadBefore(OID, p64(8)) == (b"five", p64(5), p64(8))
    assert cache.loadBefore(OID, p64(9)) is None
    cache.invalidate(OID, p64(9))  # no current record: nothing happens
    assert len(cache) == 1
    cache.invalidate(p64(2), p64(9))  # unknown oid
    cache.store(OID, p64(8), None, b"eight")
    assert cache.loadBefore(OID, p64(9)) == (b"eight", p64(8), None)
    cache.invalidate(OID, None)  # forget everything about OID
    assert len(cache) == 0
    assert cache.load(OID) is None and cache.loadBefore(OID, p64(6)) is None


def test_invalidate_older_than_current_drops_it(cache):
    cache.store(OID, p64(5), None, b"five")
    cache.invalidate(OID, p64(3))
    assert cache.load(OID) is None
    assert len(cache) == 0


def test_last_tid(cache):
    assert cache.getLastTid() is None
    cache.setLastTid(p64(5))
    cache.setLastTid(None)
    cache.setLastTid(p64(0))
    assert cache.getLastTid() == p64(5)
    cache.setLastTid(p64(3))  # empty cache: may go back
    assert cache.getLastTid() == p64(3)
    cache.store(OID, p64(2), None, b"x")
    cache.setLastTid(p64(3))  # equal: fine
    with pytest.raises(ValueError):
        cache.setLastTid(p64(2))
    cache.setLastTid(p64(4))
    assert cache.getLastTid() == p64(4)


def test_clear(cache):
    cache.store(OID, p64(5), None, b"five")
    cache.store(OID, p64(1), p64(5), b"one")
    cache.setLastTid(p64(6))
    cache.clear()
    assert len(cache) == 0
    assert cache.getLastTid() is None
    assert cache.load(OID) is None and cache.loadBefore(OID, p64(2)) is None
    assert list(cache.contents()) == []
    assert cache.statistics()["bytes"] == 0
    cache.store(OID, p64(5), None, b"five")
    assert cache.load(OID) == (b"five", p64(5))


def test_lru_eviction_bounded_by_size():
    rec = 100 + RECORD_OVERHEAD
    c = ClientCache(size=rec * 10)
    for i in range(10):
        c.store(p64(i), p64(1), None, bytes(100))
    assert len(c) == 10
    assert c.load(p64(0)) is not None  # 0 is now the most recently used
    c.store(p64(10), p64(1), None, bytes(100))  # evicts 1, the least recently used
    assert c.load(p64(1)) is None
    assert c.load(p64(0)) is not None
    assert len(c) == 10
    for i in range(11, 200):
        c.store(p64(i), p64(1), p64(2), bytes(100))  # non-current records too
        assert c.statistics()["bytes"] <= c.maxsize
    stats = c.statistics()
    assert stats["records"] == 10 == len(c)
    assert stats["evictions"] == 190
    assert c.getStats()[2] == 190
    # a record larger than the whole budget is not kept
    c.store(p64(999), p64(1), None, bytes(rec * 11))
    assert c.load(p64(999)) is None
    assert len(c) == 10


def test_eviction_of_noncurrent_keeps_lists_sorted():
    c = ClientCache(size=(10 + RECORD_OVERHEAD) * 3)
    for t in range(1, 7):
        c.store(OID, p64(t), p64(t + 1), bytes(10))
    # only the 3 most recent stores survive: start tids 4, 5, 6
    assert [s for _, s in c.contents()] == [p64(4), p64(5), p64(6)]
    assert c.loadBefore(OID, p64(3)) is None
    assert c.loadBefore(OID, p64(5)) == (bytes(10), p64(4), p64(5))


def test_statistics_counts():
    cache = ClientCache(size=1 << 20)
    cache.load(OID)
    cache.store(OID, p64(5), None, b"five")
    cache.load(OID)
    cache.loadBefore(OID, p64(9))
    cache.loadBefore(OID, p64(2))
    s = cache.statistics()
    assert (s["hits"], s["misses"], s["stores"], s["stored_bytes"]) == (2, 2, 1, 4)
    assert s["bytes"] == 4 + RECORD_OVERHEAD
    assert cache.getStats() == (1, 4, 0, 0, 4)


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_threads_hammering_keep_consistency(mode, tmp_path):
    path = None if mode == "memory" else str(tmp_path / "c.zec")
    c = ClientCache(path, size=(8 + RECORD_OVERHEAD) * 50)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(2000):
                oid = p64(i % 97)
                tid = p64(i + 1)
                c.store(oid, tid, None, tid)
                got = c.load(oid)
                if got is not None:
                    assert got[0] == got[1]  # data always matches its tid
                c.invalidate(oid, p64(i + 2))
                got = c.loadBefore(oid, p64(i + 2))
                if got is not None:
                    assert got[0] == got[1]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert len(c) == len(list(c.contents())) <= 50
    assert c.statistics()["bytes"] <= c.maxsize
    c.close()


def test_cache_path(tmp_path, monkeypatch):
    assert cache_path() is None
    assert cache_path(cache="/x/y.zec") == "/x/y.zec"
    assert cache_path(cache=tmp_path / "a.zec") == str(tmp_path / "a.zec")
    assert cache_path(client="8881", storage="spam", var=str(tmp_path)) == os.path.join(
        str(tmp_path), "8881-spam.zec"
    )
    monkeypatch.chdir(tmp_path)
    assert cache_path(client="c") == os.path.join(str(tmp_path), "c-1.zec")
    assert cache_path(cache=ClientCache(), client="c") is None  # a cache object, not a path
