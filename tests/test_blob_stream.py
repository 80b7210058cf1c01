"""Blobs stream both ways without either side holding a whole blob in memory.

A 512 MiB blob goes up and comes back down between a client process and a server process
(``runzeo``).  Each process's peak resident set (``VmHWM``) must stay far below the blob size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.servers import filestorage_conf, start_server

MiB = 1024 * 1024
BLOB_SIZE = 512 * MiB
PEAK_LIMIT = 150 * MiB

CLIENT = textwrap.dedent(r"""
    import hashlib, json, os, sys
    import transaction, ZODB, ZODB.blob
    from ZEO.ClientStorage import ClientStorage

    def peak():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

    host, port, size, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    addr = (host, port)
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()

    db = ZODB.DB(ClientStorage(addr, blob_dir=os.path.join(workdir, "cache-up")))
    conn = db.open()
    blob = ZODB.blob.Blob()
    with blob.open("w") as f:
        for _ in range(size // len(block)):
            f.write(block)
            digest.update(block)
    conn.root.blob = blob
    transaction.commit()
    oid = blob._p_oid
    db.close()
    after_upload = peak()

    # A second client with an empty cache: the blob has to come down over the wire.
    storage = ClientStorage(addr, blob_dir=os.path.join(workdir, "cache-down"))
    db = ZODB.DB(storage)
    conn = db.open()
    down = hashlib.sha256()
    with conn.root.blob.open("r") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            down.update(chunk)
    serial = conn.root.blob._p_serial
    path = storage.loadBlob(oid, serial)
    db.close()
    print(json.dumps({
        "up_peak": after_upload, "peak": peak(), "size": os.path.getsize(path),
        "same": down.hexdigest() == digest.hexdigest(),
        "cached_in": os.path.dirname(os.path.dirname(path)),
    }))
""")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_half_gib_blob_streams_both_ways_in_bounded_memory(tmp_path: Path) -> None:
    server = start_server("ours", tmp_path / "server",
                          filestorage_conf(tmp_path / "Data.fs", blob_dir=tmp_path / "blobs"))
    try:
        host, port = server.addr
        src = Path(__file__).resolve().parent.parent / "src"
        out = subprocess.run(
            [sys.executable, "-c", CLIENT, host, str(port), str(BLOB_SIZE), str(tmp_path)],
            capture_output=True, text=True, timeout=150,
            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        )
        assert out.returncode == 0, out.stderr
        server_peak = _peak_rss(server.proc.pid)
    finally:
        server.stop()
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["same"], "the downloaded blob differs from the uploaded one"
    assert report["size"] == BLOB_SIZE
    assert report["cached_in"] == str(tmp_path / "cache-down")
    assert report["up_peak"] < PEAK_LIMIT, report
    assert report["peak"] < PEAK_LIMIT, report
    assert server_peak < PEAK_LIMIT, server_peak
