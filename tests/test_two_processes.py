"""Two client processes on one server: one commits, the other sees the invalidation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import transaction

import ZEO
from support.servers import filestorage_conf, start_server

pytestmark = pytest.mark.timeout(60)

WATCHER = textwrap.dedent("""
    import json, sys, time, transaction, ZEO
    db = ZEO.DB(("127.0.0.1", int(sys.argv[1])))
    conn = db.open()
    before = conn.root()["x"]
    seen = db.storage.lastTransaction()
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + 20
    # Only an invalidation from the server can move lastTransaction(): we send nothing.
    while db.storage.lastTransaction() == seen and time.monotonic() < deadline:
        time.sleep(0.01)
    transaction.begin()
    print(json.dumps({"before": before, "after": conn.root()["x"],
                      "tid": db.storage.lastTransaction().hex()}), flush=True)
    db.close()
""")


def test_commit_in_one_process_is_seen_by_another(tmp_path):
    server = start_server("ours", tmp_path / "srv", filestorage_conf(tmp_path / "Data.fs"))
    try:
        db = ZEO.DB(server.addr)
        with db.transaction() as conn:
            conn.root()["x"] = 1
        watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(server.addr[1])],
                                   stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(watcher.stdout.readline()) == {"ready": True}
            conn = db.open()
            conn.root()["x"] = 2
            transaction.commit()
            tid = db.storage.lastTransaction().hex()
            conn.close()
            report = json.loads(watcher.stdout.readline())
        finally:
            watcher.wait(30)
        assert report == {"before": 1, "after": 2, "tid": tid}
        db.close()
    finally:
        server.stop()
