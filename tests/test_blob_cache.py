"""The client blob cache: upload timing, downloads, pruning, several processes sharing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import transaction
import zc.lockfile
import ZODB
import ZODB.blob
import ZODB.config
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64

from ZEO.client.blob import BlobCache, cached_files, prune
from ZEO.ClientStorage import ClientStorage, check_blob_size_script

SRC = str(Path(__file__).resolve().parent.parent / "src")
KiB = 1024


@pytest.fixture
def server(make_server_process):
    return make_server_process(blobs=True)


def _content(i: int, size: int) -> bytes:
    head = f"blob {i} ".encode()
    return head + bytes([i % 251]) * (size - len(head))


def _commit_blobs(addr, tmp_path: Path, count: int, size: int) -> None:
    db = ZODB.DB(ClientStorage(addr, blob_dir=str(tmp_path / "writer-cache")))
    try:
        conn = db.open()
        for i in range(count):
            conn.root()[f"b{i}"] = ZODB.blob.Blob(_content(i, size))
        transaction.commit()
    finally:
        db.close()


def test_blob_is_on_the_server_before_the_vote(server, tmp_path: Path) -> None:
    """storeBlob streams at once, so the commit lock is never held while bytes travel."""
    storage = ClientStorage(server.addr, blob_dir=str(tmp_path / "cache"))
    try:
        server_tmp = tmp_path / "s-blobs" / "tmp"
        before = set(os.listdir(server_tmp)) if server_tmp.exists() else set()
        payload = b"x" * (300 * KiB)
        blob_file = tmp_path / "upload"
        blob_file.write_bytes(payload)
        oid = storage.new_oid()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.storeBlob(oid, p64(0), b"record", str(blob_file), "", txn)
        storage.ping()  # one-way calls are handled in order, before this reply
        new = set(os.listdir(server_tmp)) - before
        assert [os.path.getsize(server_tmp / n) for n in new] == [len(payload)]
        assert not blob_file.exists()  # the storage took the file
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
        cached = storage.loadBlob(oid, tid)
        assert Path(cached).read_bytes() == payload
        assert Path(cached).parent.parent == tmp_path / "cache"
        assert not os.stat(cached).st_mode & 0o222
    finally:
        storage.close()


def test_download_and_abort_cleanup(server, tmp_path: Path) -> None:
    _commit_blobs(server.addr, tmp_path, 3, 100 * KiB)
    db = ZODB.DB(ClientStorage(server.addr, blob_dir=str(tmp_path / "cache")))
    try:
        conn = db.open()
        storage = db.storage
        for i in range(3):
            with conn.root()[f"b{i}"].open() as f:
                assert f.read() == _content(i, 100 * KiB)
        files = cached_files(str(tmp_path / "cache"))
        assert len(files) == 3
        assert not list((tmp_path / "cache").glob("*/*.dl"))
        # An aborted upload leaves nothing staged behind.
        with conn.root()["b0"].open("w") as f:
            f.write(b"never committed")
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        src = tmp_path / "aborted"
        src.write_bytes(b"aborted")
        storage.storeBlob(storage.new_oid(), p64(0), b"r", str(src), "", txn)
        storage.tpc_abort(txn)
        transaction.abort()
        assert os.listdir(storage.temporaryDirectory()) == []
        # A blob the server does not have is a POSKeyError, and leaves no partial file.
        with pytest.raises(ZODB.POSException.POSKeyError):
            storage.loadBlob(p64(999999), p64(1))
        assert not list((tmp_path / "cache").glob("*/*.dl"))
    finally:
        db.close()


def _make_cache(tmp_path: Path, count: int, size: int) -> tuple[BlobCache, list[str]]:
    cache = BlobCache(str(tmp_path / "cache"))
    paths = []
    now = time.time()
    for i in range(count):
        path = cache.path(p64(i + 1), p64(1000 + i))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_bytes(_content(i, size))
        os.utime(path, (now - 1000 + i, now - 1000))  # oldest access first
        paths.append(path)
    return cache, paths


def test_prune_removes_least_recently_used_and_skips_files_in_use(tmp_path: Path) -> None:
    cache, paths = _make_cache(tmp_path, 6, 10 * KiB)

    def no_fetch(oid: bytes, serial: bytes) -> None:
        raise AssertionError("the file is cached: no download")

    held = cache.open_committed(p64(1), p64(1000), no_fetch)  # the oldest file, open
    dir_lock = zc.lockfile.LockFile(os.path.join(cache.oid_dir(p64(2)), ".lock"))  # downloading
    try:
        cache.lookup(p64(3), p64(1002))  # a hit makes it the most recently used
        assert prune(cache.blob_dir, 25 * KiB) == 20 * KiB
        remaining = {p for p in paths if os.path.exists(p)}
        assert remaining == {paths[0], paths[1]}
        assert held.read() == _content(0, 10 * KiB)
        assert prune(cache.blob_dir, 0) == 20 * KiB  # still in use: still there
    finally:
        held.close()
        dir_lock.close()
    assert prune(cache.blob_dir, 0) == 0
    assert cached_files(cache.blob_dir) == []


def test_prune_defers_to_a_running_pruner(tmp_path: Path, capsys) -> None:
    cache, paths = _make_cache(tmp_path, 3, 10 * KiB)
    lock = zc.lockfile.LockFile(os.path.join(cache.blob_dir, "check_size.lock"))
    try:
        assert prune(cache.blob_dir, 0) is None
        assert os.path.exists(os.path.join(cache.blob_dir, "check_size.attempt"))
        assert all(os.path.exists(p) for p in paths)
    finally:
        lock.close()
    check_blob_size_script([cache.blob_dir, str(10 * KiB)])
    assert "10240 bytes" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(cache.blob_dir, "check_size.attempt"))
    assert sum(os.path.exists(p) for p in paths) == 1


def test_cache_size_bound_is_enforced_after_downloads(server, tmp_path: Path) -> None:
    _commit_blobs(server.addr, tmp_path, 20, 50 * KiB)
    limit = 300 * KiB
    storage = ClientStorage(server.addr, blob_dir=str(tmp_path / "cache"),
                            blob_cache_size=limit, blob_cache_size_check=20)
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        for i in range(20):
            with conn.root()[f"b{i}"].open() as f:
                assert f.read() == _content(i, 50 * KiB)
        blobs = storage._blobs
        assert blobs.downloads == 20
        blobs.join_pruner(30)
        total = sum(size for _a, size, _p in cached_files(str(tmp_path / "cache")))
        assert total <= limit
        assert blobs.prunes >= 2
        # The most recently used survive; pruned ones come back on demand.
        with conn.root()["b0"].open() as f:
            assert f.read() == _content(0, 50 * KiB)
        assert blobs.downloads == 21
    finally:
        db.close()


def test_client_config_reaches_the_blob_cache(server, tmp_path: Path) -> None:
    host, port = server.addr
    storage = ZODB.config.storageFromString(textwrap.dedent(f"""
        %import ZEO
        <clientstorage>
          server {host}:{port}
          blob-dir {tmp_path / "cache"}
          blob-cache-size 1MB
          blob-cache-size-check 25
        </clientstorage>
    """))
    try:
        assert ZODB.interfaces.IBlobStorage.providedBy(storage)
        blobs = storage._blobs
        assert (blobs.size, blobs.check_bytes) == (1 << 20, 1 << 18)
        assert (tmp_path / "cache" / ".layout").read_text() == "zeocache"
    finally:
        storage.close()
    with pytest.raises(ValueError, match="layout"):
        ClientStorage(server.addr, blob_dir=str(tmp_path / "s-blobs"))


WORKER = textwrap.dedent(r"""
    import json, os, random, sys, time
    import transaction, ZODB
    from ZEO.ClientStorage import ClientStorage

    host, port, cache_dir, limit, count, size, seed = sys.argv[1:]
    count, size = int(count), int(size)
    rng = random.Random(int(seed))

    def content(i):
        head = f"blob {i} ".encode()
        return head + bytes([i % 251]) * (size - len(head))

    storage = ClientStorage((host, int(port)), blob_dir=cache_dir, blob_cache_size=int(limit),
                            blob_cache_size_check=10)
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    problems = []
    held = []
    deadline = time.monotonic() + 4
    opened = 0
    while time.monotonic() < deadline or opened < 150:
        i = rng.randrange(count)
        f = root[f"b{i}"].open("r")
        opened += 1
        if f.read() != content(i):
            problems.append(f"bad content for blob {i}")
        held.append((i, f))
        if len(held) > 3:
            j, old = held.pop(0)
            # Still open: the file must still be in the cache, under its name.
            if not os.path.exists(old.name) or os.fstat(old.fileno()).st_nlink != 1:
                problems.append(f"blob {j} was deleted while open")
            old.seek(0)
            if old.read() != content(j):
                problems.append(f"blob {j} changed while open")
            old.close()
        transaction.abort()
    for _j, f in held:
        f.close()
    stats = storage._blobs.statistics()
    db.close()
    print(json.dumps({"problems": problems, "opened": opened, "downloads": stats["downloads"],
                      "prunes": stats["prunes"]}))
""")


@pytest.mark.timeout(120)
def test_two_processes_share_a_pruned_cache_without_losing_files_in_use(
        server, tmp_path: Path) -> None:
    count, size = 40, 32 * KiB
    _commit_blobs(server.addr, tmp_path, count, size)
    cache_dir = tmp_path / "shared-cache"
    limit = 8 * size  # a fifth of the blobs fit
    host, port = server.addr
    env = {"PYTHONPATH": SRC, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, host, str(port), str(cache_dir), str(limit),
             str(count), str(size), str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for seed in (1, 2)
    ]
    reports = []
    for w in workers:
        out, err = w.communicate(timeout=90)
        assert w.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    for r in reports:
        assert r["problems"] == [], r["problems"][:10]
        assert r["prunes"] >= 1
    downloads = sum(r["downloads"] for r in reports)
    # Pruning really happened: far more downloads than distinct blobs.
    assert downloads > 2 * count, reports
    assert not list(cache_dir.glob("*/*.dl"))
    assert prune(str(cache_dir), limit) <= limit


OPEN_CACHE = textwrap.dedent("""
    import sys, time
    from ZEO.client.blob import BlobCache
    start = float(sys.argv[2])
    while time.time() < start:
        pass
    BlobCache(sys.argv[1], None).close()
""")


def test_processes_creating_one_cache_at_once_all_accept_its_layout(tmp_path: Path) -> None:
    # A cache directory created by several processes at the same moment: none of them may
    # read the layout marker half-written (CI once saw layout '' here).
    env = {"PYTHONPATH": SRC, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for round_ in range(5):
        cache_dir = tmp_path / f"cache-{round_}"
        start = time.time() + 1.0
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_CACHE, str(cache_dir), str(start)],
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(6)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        assert (cache_dir / ZODB.blob.LAYOUT_MARKER).read_text() == "zeocache"
        assert not list(cache_dir.glob(".layout-*"))
