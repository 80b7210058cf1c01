"""The persistent ClientCache: reopen, crashes, damaged files, locking, size bound, tracing.

A "crash" is either a real child process that exits with ``os._exit`` while its cache is open,
or (in process) dropping the cache without ``close()``: the file descriptor is closed and the
lock released, so the index is never written and the header stays dirty, as after a kill.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap

import pytest

from ZEO.client.cache import (
    DATA_START,
    HDR,
    SCAN_CHUNK,
    CacheLockedError,
    ClientCache,
    PersistentClientCache,
)

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def p64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def u64(b: bytes) -> int:
    return int.from_bytes(b, "big")


def crash(c: PersistentClientCache) -> None:
    """Abandon ``c`` as a killed process would: no index, no clean header."""
    os.close(c._fd)
    c._fd = -1
    c._closed = True
    c._lockfile.close()


def run_child(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class History:
    """The committed truth for a few objects, and the checks a cache must pass against it."""

    def __init__(self, rng: random.Random, n_oids: int = 40) -> None:
        self.rng = rng
        self.oids = [p64(i) for i in range(1, n_oids + 1)]
        self.tid = 1
        self.revs: dict[bytes, list[int]] = {oid: [1] for oid in self.oids}

    def data(self, oid: bytes, tid: int) -> bytes:
        n = (u64(oid) * 7919 + tid * 104729) % 300
        return oid + p64(tid) + bytes([tid % 251]) * n

    def commit(self, cache: ClientCache) -> None:
        self.tid += 1
        for oid in self.rng.sample(self.oids, self.rng.randint(1, 4)):
            self.revs[oid].append(self.tid)
            cache.invalidate(oid, p64(self.tid))
        cache.setLastTid(p64(self.tid))

    def revision_before(self, oid: bytes, before: int) -> tuple[int, int | None]:
        """(start, end) of the revision of ``oid`` current just before ``before``."""
        revs = [t for t in self.revs[oid] if t <= self.tid]
        start = max(t for t in revs if t < before)
        later = [t for t in revs if t > start]
        return start, (min(later) if later else None)

    def fill(self, cache: ClientCache) -> None:
        """A client's cache misses: load current and historical revisions into the cache."""
        oid = self.rng.choice(self.oids)
        if self.rng.random() < 0.6:
            if cache.load(oid) is None:
                start, _ = self.revision_before(oid, self.tid + 1)
                cache.store(oid, p64(start), None, self.data(oid, start))
        else:
            before = self.rng.randint(2, self.tid + 1)
            if cache.loadBefore(oid, p64(before)) is None:
                start, end = self.revision_before(oid, before)
                cache.store(oid, p64(start), None if end is None else p64(end),
                            self.data(oid, start))

    def check(self, cache: ClientCache) -> int:
        """Every record the cache returns is true as of the cache's last tid; hits counted."""
        last = cache.getLastTid()
        last_n = u64(last) if last is not None else 0
        hits = 0
        for oid, start in list(cache.contents()):
            s = u64(start)
            assert s in self.revs[oid], "a revision that never existed"
            later = [t for t in self.revs[oid] if t > s]
            got = cache.loadBefore(oid, p64(s + 1))
            if got is None:  # dropped as damaged: a miss is always allowed
                continue
            hits += 1
            data, gs, ge = got
            assert gs == start and data == self.data(oid, s)
            if ge is None:
                # current: no later revision the cache should know of
                assert not [t for t in later if t <= last_n], (oid, s, later, last_n)
                assert cache.load(oid) == (data, start)
            else:
                assert later and u64(ge) == min(later)
        return hits

    def verify(self, cache: ClientCache) -> None:
        """What ClientStorage does on reconnect: drop what changed since the cache's tid."""
        last = cache.getLastTid()
        if last is None:
            if len(cache):
                cache.clear()
        else:
            for oid in self.oids:
                if any(t > u64(last) for t in self.revs[oid]):
                    cache.invalidate(oid, None)
        cache.setLastTid(p64(self.tid))


def fill_and_commit(h: History, c: ClientCache, steps: int) -> None:
    for _ in range(steps):
        if h.rng.random() < 0.25:
            h.commit(c)
        else:
            h.fill(c)


def test_reopen_keeps_records_and_last_tid(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    assert isinstance(c, PersistentClientCache) and c.path == path
    h = History(random.Random(1))
    fill_and_commit(h, c, 500)
    before = sorted(c.contents())
    last = c.getLastTid()
    assert len(before) > 20
    c.close()
    c = ClientCache(path, size=1 << 20)
    try:
        s = c.statistics()
        assert s["open_mode"] == "index" and s["open_records_scanned"] == 0
        assert sorted(c.contents()) == before
        assert c.getLastTid() == last
        assert h.check(c) == len(before)
    finally:
        c.close()


def test_reopen_after_crash_scans_headers_and_keeps_everything(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    h = History(random.Random(2))
    fill_and_commit(h, c, 500)
    before, last = sorted(c.contents()), c.getLastTid()
    crash(c)
    c = ClientCache(path, size=1 << 20)
    try:
        s = c.statistics()
        assert s["open_mode"] == "scan"
        assert s["open_records_scanned"] > len(before)
        assert sorted(c.contents()) == before and c.getLastTid() == last
        assert h.check(c) == len(before)
    finally:
        c.close()


def test_child_process_killed_while_writing(tmp_path):
    """A real process exits without closing; its last tid and records survive."""
    path = str(tmp_path / "c.zec")
    r = run_child(f"""
        import os
        from ZEO.client.cache import ClientCache
        c = ClientCache({path!r}, size=1 << 20)
        for i in range(1, 1001):
            c.store(i.to_bytes(8, "big"), (5).to_bytes(8, "big"), None, b"d%d" % i)
        c.invalidate((7).to_bytes(8, "big"), (9).to_bytes(8, "big"))
        c.setLastTid((9).to_bytes(8, "big"))
        os._exit(0)
    """)
    assert r.returncode == 0, r.stderr
    c = ClientCache(path, size=1 << 20)
    try:
        assert c.statistics()["open_mode"] == "scan"
        assert c.getLastTid() == p64(9)
        assert len(c) == 1000
        assert c.load(p64(7)) is None
        assert c.loadBefore(p64(7), p64(9)) == (b"d7", p64(5), p64(9))
        assert all(c.load(p64(i)) == (b"d%d" % i, p64(5)) for i in range(8, 1001))
    finally:
        c.close()


def test_torn_last_write_is_dropped(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    for i in range(1, 11):
        c.store(p64(i), p64(3), None, bytes([i]) * 500)
    c.setLastTid(p64(3))
    c.store(p64(11), p64(3), None, b"last" * 100)
    crash(c)
    size = os.path.getsize(path)
    for cut in (size - 1, size - 200, size - 400 - HDR + 10):  # in the data, in the header
        with open(path, "r+b") as f:
            f.truncate(cut)
        c = ClientCache(path, size=1 << 20)
        assert c.load(p64(11)) is None
        assert c.getLastTid() == p64(3)
        assert [c.load(p64(i)) for i in range(1, 11)] == [
            (bytes([i]) * 500, p64(3)) for i in range(1, 11)
        ]
        assert os.path.getsize(path) < cut + 1
        crash(c)


def test_corrupt_data_byte_is_detected_and_record_dropped(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    for i in range(1, 11):
        c.store(p64(i), p64(3), None, bytes([i]) * 500)
    victim = c._current[p64(4)].pos + HDR + 250
    c.close()
    with open(path, "r+b") as f:
        f.seek(victim)
        f.write(b"\xff")
    c = ClientCache(path, size=1 << 20)
    assert c.statistics()["open_mode"] == "index"
    assert c.load(p64(4)) is None
    assert c.statistics()["bad_records"] == 1
    assert c.load(p64(5)) == (bytes([5]) * 500, p64(3))
    crash(c)
    c = ClientCache(path, size=1 << 20)  # after a scan the damaged record stays dropped
    try:
        assert c.statistics()["open_mode"] == "scan"
        assert c.load(p64(4)) is None and p64(4) not in dict(c.contents())
        assert len(c) == 9
    finally:
        c.close()


def test_corrupt_header_in_the_middle_truncates_there(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    for i in range(1, 11):
        c.store(p64(i), p64(3), None, bytes([i]) * 500)
    victim = c._current[p64(6)].pos + 20
    crash(c)
    with open(path, "r+b") as f:
        f.seek(victim)
        f.write(b"\x00\x01")
    c = ClientCache(path, size=1 << 20)
    try:
        assert [c.load(p64(i)) for i in range(1, 6)] == [
            (bytes([i]) * 500, p64(3)) for i in range(1, 6)
        ]
        assert all(c.load(p64(i)) is None for i in range(6, 11))
        assert len(c) == 5
        c.store(p64(6), p64(3), None, b"again")  # the file goes on from there
        assert c.load(p64(6)) == (b"again", p64(3))
    finally:
        c.close()


def test_corrupt_file_header_sets_file_aside(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    c.store(p64(1), p64(3), None, b"x")
    c.close()
    with open(path, "r+b") as f:
        f.write(b"NOTACACHE")
    c = ClientCache(path, size=1 << 20)
    try:
        assert os.path.exists(path + ".bad")
        s = c.statistics()
        assert s["open_mode"] == "rebuilt" and s["set_aside"] == 1
        assert len(c) == 0 and c.load(p64(1)) is None
        c.store(p64(1), p64(3), None, b"y")
    finally:
        c.close()
    c = ClientCache(path, size=1 << 20)
    try:
        assert c.load(p64(1)) == (b"y", p64(3))
    finally:
        c.close()


def test_damaged_or_stale_index_is_not_used(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    for i in range(1, 101):
        c.store(p64(i), p64(3), None, b"v1")
    c.close()
    with open(path + ".index", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    c = ClientCache(path, size=1 << 20)
    assert c.statistics()["open_mode"] == "scan"
    assert len(c) == 100
    assert not os.path.exists(path + ".index")  # removed while the file is open
    c.close()
    # An index kept from an older close must not hide later writes.
    import shutil

    shutil.copy(path + ".index", str(tmp_path / "old.index"))
    c = ClientCache(path, size=1 << 20)
    assert c.statistics()["open_mode"] == "index"
    c.invalidate(p64(1), p64(4))
    c.setLastTid(p64(4))
    crash(c)
    shutil.copy(str(tmp_path / "old.index"), path + ".index")
    c = ClientCache(path, size=1 << 20)
    try:
        assert c.statistics()["open_mode"] == "scan"
        assert c.load(p64(1)) is None and c.getLastTid() == p64(4)
    finally:
        c.close()


def test_clear_is_durable(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    for i in range(1, 11):
        c.store(p64(i), p64(3), None, b"old")
    c.setLastTid(p64(3))
    c.clear()
    c.store(p64(1), p64(8), None, b"new")
    crash(c)
    c = ClientCache(path, size=1 << 20)
    try:
        assert len(c) == 1 and c.load(p64(1)) == (b"new", p64(8))
        assert c.getLastTid() is None
    finally:
        c.close()


def test_second_open_in_same_process_is_refused(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    try:
        with pytest.raises(CacheLockedError) as exc:
            ClientCache(path, size=1 << 20)
        assert path in str(exc.value)
    finally:
        c.close()
    ClientCache(path, size=1 << 20).close()  # free again after close


def test_other_process_holding_the_cache_is_refused(tmp_path):
    path = str(tmp_path / "c.zec")
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from ZEO.client.cache import ClientCache
            c = ClientCache({path!r}, size=1 << 20)
            print("open", flush=True)
            sys.stdin.readline()
            c.close()
        """)],
        env=dict(os.environ, PYTHONPATH=SRC),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "open"
        with pytest.raises(CacheLockedError) as exc:
            ClientCache(path, size=1 << 20)
        assert path in str(exc.value) and "in use" in str(exc.value)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    ClientCache(path, size=1 << 20).close()


def test_size_bound_respected_over_many_laps(tmp_path):
    path = str(tmp_path / "c.zec")
    size = 64 * 1024
    rng = random.Random(3)
    c = ClientCache(path, size=size, rearrange=0.8)
    h = History(rng, n_oids=300)
    for i in range(8000):
        if rng.random() < 0.2:
            h.commit(c)
        else:
            h.fill(c)
        if i % 500 == 0:
            assert os.path.getsize(path) <= size
            h.check(c)
    s = c.statistics()
    assert os.path.getsize(path) <= size and s["file_size"] <= size
    assert s["evictions"] > 1000  # many laps around the ring
    assert s["hits"] > 0 and s["rearranged"] > 0
    n = h.check(c)
    assert n == len(c) > 50
    crash(c)
    c = ClientCache(path, size=size)
    try:
        assert h.check(c) == len(c) > 50
    finally:
        c.close()


def test_record_bigger_than_the_cache_is_not_kept(tmp_path):
    c = ClientCache(str(tmp_path / "c.zec"), size=4096)
    try:
        c.store(p64(1), p64(1), None, bytes(5000))
        assert c.load(p64(1)) is None and len(c) == 0
        c.store(p64(2), p64(1), None, bytes(3000))
        c.store(p64(3), p64(1), None, bytes(3000))  # evicts 2
        assert c.load(p64(2)) is None and c.load(p64(3)) == (bytes(3000), p64(1))
        assert os.path.getsize(c.path) <= 4096
    finally:
        c.close()


def test_too_big_current_record_still_supersedes_the_cached_one(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=4096)
    c.store(p64(1), p64(1), None, b"old")
    c.store(p64(1), p64(2), None, bytes(5000))  # newer, too big to keep
    assert c.load(p64(1)) is None
    crash(c)
    c = ClientCache(path, size=4096)
    try:
        assert c.load(p64(1)) is None and len(c) == 0  # the old one did not come back
    finally:
        c.close()


def test_smaller_size_on_reopen_empties_the_cache(tmp_path):
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=1 << 20)
    for i in range(1, 101):
        c.store(p64(i), p64(3), None, bytes(1000))
    c.close()
    c = ClientCache(path, size=10_000)
    try:
        assert len(c) == 0 and os.path.getsize(path) <= 10_000
    finally:
        c.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_crashes_and_damage_never_give_wrong_data(tmp_path, seed):
    """Fuzz: commits, fills, crashes, torn tails and flipped bytes; every hit stays true."""
    path = str(tmp_path / "c.zec")
    rng = random.Random(seed)
    size = 48 * 1024
    h = History(rng, n_oids=120)
    c = ClientCache(path, size=size)
    for _round in range(12):
        fill_and_commit(h, c, rng.randint(50, 400))
        h.check(c)
        how = rng.choice(["close", "crash", "truncate", "flip", "zeros"])
        if how == "close":
            c.close()
        else:
            crash(c)
            n = os.path.getsize(path)
            if how == "truncate" and n > DATA_START:
                with open(path, "r+b") as f:
                    f.truncate(rng.randint(DATA_START, n))
            elif how in ("flip", "zeros") and n > DATA_START:
                at = rng.randint(DATA_START, n - 1)
                with open(path, "r+b") as f:
                    f.seek(at)
                    old = f.read(1)
                    f.seek(at)
                    f.write(bytes([old[0] ^ 0x5A]) if how == "flip" else bytes(min(50, n - at)))
        c = ClientCache(path, size=size)
        assert c.getLastTid() is None or u64(c.getLastTid()) <= h.tid
        h.check(c)  # whatever survived is true as of the cache's own last tid
        h.verify(c)
        h.check(c)
    c.close()


def test_trace_file(tmp_path, monkeypatch):
    path = str(tmp_path / "c.zec")
    monkeypatch.setenv("ZEO_CACHE_TRACE", "1")
    c = ClientCache(path, size=1 << 20)
    assert c.statistics()["tracing"]
    c.load(p64(1))
    c.store(p64(1), p64(3), None, b"abc")
    c.load(p64(1))
    c.invalidate(p64(1), p64(5))
    c.loadBefore(p64(1), p64(5))
    c.loadBefore(p64(1), p64(2))
    c.store(p64(1), p64(5), p64(6), b"de")
    c.invalidate(p64(1), None)
    c.invalidate(p64(2), p64(7))
    c.close()
    raw = open(path + ".trace", "rb").read()
    rec = struct.Struct(">dB3xI8s8s8s")
    assert len(raw) % rec.size == 0 and rec.size == 40
    rows = [(code, dlen, oid, tid, end) for _, code, dlen, oid, tid, end in rec.iter_unpack(raw)]
    z = p64(0)
    assert rows == [
        (0x00, 0, z, z, z),
        (0x20, 0, p64(1), z, z),
        (0x52, 3, p64(1), p64(3), z),
        (0x22, 3, p64(1), p64(3), z),
        (0x1C, 0, p64(1), p64(3), p64(5)),
        (0x26, 3, p64(1), p64(3), p64(5)),
        (0x24, 0, p64(1), p64(2), z),
        (0x54, 2, p64(1), p64(5), p64(6)),
        (0x1E, 0, p64(1), z, z),
        (0x10, 0, p64(2), p64(7), z),
    ]
    monkeypatch.delenv("ZEO_CACHE_TRACE")
    ClientCache(path, size=1 << 20).close()
    assert len(open(path + ".trace", "rb").read()) == len(raw)  # tracing off: untouched


def test_large_cache_reopens_without_reading_records(tmp_path):
    """50k records: a clean reopen reads only the index; a crash reopen reads only headers."""
    path = str(tmp_path / "c.zec")
    n = 50_000
    c = ClientCache(path, size=64 << 20)
    data = bytes(200)
    for i in range(1, n + 1):
        c.store(p64(i), p64(2), None, data)
    c.setLastTid(p64(2))
    c.close()
    file_size = os.path.getsize(path)
    index_size = os.path.getsize(path + ".index")
    assert index_size < file_size / 3
    c = ClientCache(path, size=64 << 20)
    s = c.statistics()
    assert s["open_mode"] == "index" and len(c) == n
    assert s["open_records_scanned"] == 0
    # the file header, the index, and one header probe at the head: no record data
    assert s["open_bytes_read"] <= DATA_START + index_size + HDR
    assert c.load(p64(n // 2)) == (data, p64(2)) and c.getLastTid() == p64(2)
    crash(c)
    c = ClientCache(path, size=64 << 20)
    try:
        s = c.statistics()
        assert s["open_mode"] == "scan" and len(c) == n
        assert s["open_records_scanned"] == n + 1  # the data records and one last-tid record
        assert c.load(p64(7)) == (data, p64(2))
    finally:
        c.close()


def test_scan_jumps_over_big_records(tmp_path):
    """After a crash, the header scan does not read the data of big records."""
    path = str(tmp_path / "c.zec")
    c = ClientCache(path, size=64 << 20)
    big = bytes(300_000)
    for i in range(1, 31):
        c.store(p64(i), p64(2), None, big)
    crash(c)
    file_size = os.path.getsize(path)
    c = ClientCache(path, size=64 << 20)
    try:
        s = c.statistics()
        assert s["open_mode"] == "scan" and s["open_records_scanned"] == 30 and len(c) == 30
        # the first read is a full chunk, then one page per big record
        assert s["open_bytes_read"] <= DATA_START + SCAN_CHUNK + 30 * 4096 < file_size / 5
        assert c.load(p64(30)) == (big, p64(2))
    finally:
        c.close()
