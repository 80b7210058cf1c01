"""Faults injected between clients and a real server: zero stale reads, zero lost commits.

Three client threads (each its own ClientStorage and DB) and one client process read and write
through a :class:`~support.proxy.FaultProxy` while a fault is injected at one point of the
protocol again and again.  Afterwards :func:`support.history.check` compares every read with
the committed history in the FileStorage and looks up every acknowledged commit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

import ZEO
import ZEO.ClientStorage
from support.history import Record, check, populate, run_client
from support.proxy import DOWN, UP, FaultProxy
from support.servers import filestorage_conf, start_server
from ZEO.Exceptions import ClientDisconnected

pytestmark = pytest.mark.timeout(120)

THREADS = 3
SECONDS = 3.0
HERE = Path(__file__).parent

# name -> (direction, pattern, when, action, every); None: server restarts instead
SCENARIOS = {
    "cut-during-load": (UP, b"loadBefore", "after", "cut", 7),
    "reset-during-load": (UP, b"loadBefore", "before", "reset", 11),
    "cut-before-vote": (UP, b"vote", "before", "cut", 4),
    "cut-after-vote": (UP, b"tpc_finish", "before", "cut", 4),
    "reset-after-tpc_finish-sent": (UP, b"tpc_finish", "after", "reset", 4),
    "cut-during-invalidation-fanout": (DOWN, b"invalidateTransaction", "before", "cut", 5),
    "server-sigkill-restart": None,
}


def _run_scenario(tmp_path: Path, name: str) -> dict:
    data_fs = tmp_path / "Data.fs"
    conf = filestorage_conf(data_fs)
    server = start_server("ours", tmp_path / "srv", conf)
    addr = server.addr
    proxy = FaultProxy(addr)
    try:
        db = ZEO.DB(addr)
        populate(db)
        db.close()

        stop = threading.Event()
        records = [Record(f"t{i}") for i in range(THREADS)]
        threads = [threading.Thread(target=run_client, args=(proxy.addr, r.cid, stop, r),
                                    kwargs={"seed": i}) for i, r in enumerate(records)]
        out = tmp_path / "proc.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "support" / "history.py"),
             f"{proxy.addr[0]}:{proxy.addr[1]}", "p0", str(SECONDS), str(out)], env=env)
        for t in threads:
            t.start()
        spec = SCENARIOS[name]
        trigger = None
        if spec is not None:
            direction, pattern, when, action, every = spec
            trigger = proxy.on(direction, pattern, when=when, action=action, every=every)
            time.sleep(SECONDS)
        else:
            for _ in range(3):
                time.sleep(SECONDS / 3)
                server.send_signal(signal.SIGKILL)
                server.stop()
                server = start_server("ours", tmp_path / "srv", conf, addr=addr)
        stop.set()
        for t in threads:
            t.join(60)
        assert proc.wait(60) == 0
        records.append(Record.from_json(out.read_text()))
    finally:
        proxy.close()
        server.stop()
    result = check(str(data_fs), records)
    result["faults"] = trigger.fired if trigger is not None else 3
    result["errors"] = {}
    for r in records:
        assert not r.unexpected, (r.cid, r.unexpected[:5])
        for k, v in r.errors.items():
            result["errors"][k] = result["errors"].get(k, 0) + v
    print(name, result)
    return result


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_stale_read_no_lost_commit(tmp_path, name):
    result = _run_scenario(tmp_path, name)
    assert result["faults"] > 0, result
    assert result["commits"] > 0 and result["reads"] > 0, result
    assert result["stale"] == 0, result["examples"]
    assert result["lost"] == 0, result["examples"]
    # The clients kept committing after the faults (no wedged client): every client got some.
    fs = FileStorage(str(tmp_path / "Data.fs"), read_only=True)
    try:
        fs_db = ZODB.DB(fs)
        with fs_db.transaction() as conn:
            writers = {conn.root()[f"o{i}"]["v"].split(":")[0] for i in range(8)}
        fs_db.close()
    finally:
        fs.close()
    assert writers, writers


@pytest.fixture
def server(server_process):
    return server_process


def test_pending_call_fails_at_once_when_the_connection_drops(server):
    with FaultProxy(server.addr) as proxy:
        storage = ZEO.ClientStorage.ClientStorage(proxy.addr, wait_timeout=5)
        try:
            proxy.hold()
            outcome: list = []

            def call() -> None:
                try:
                    storage.server_status()  # no per-call timeout: only the drop ends it
                    outcome.append("returned")
                except ClientDisconnected as e:
                    outcome.append(e)

            t = threading.Thread(target=call)
            t.start()
            time.sleep(0.2)
            assert not outcome  # held: no reply
            proxy.cut()
            t.join(10)
            assert outcome and isinstance(outcome[0], ClientDisconnected), outcome
            proxy.release()
        finally:
            storage.close()


def test_transaction_in_progress_fails_with_client_disconnected(server):
    import transaction

    with FaultProxy(server.addr) as proxy:
        db = ZEO.DB(proxy.addr, wait_timeout=5)
        try:
            tm = transaction.TransactionManager()
            conn = db.open(transaction_manager=tm)
            conn.root()["x"] = 1
            tm.commit()
            conn.root()["x"] = 2
            proxy.on(UP, b"vote", limit=1)  # dropped after tpc_begin and the stores
            with pytest.raises(ClientDisconnected):
                tm.commit()
            tm.abort()
            # Reconnected: the next transaction works and sees the old value.
            deadline = time.monotonic() + 10
            while not db.storage.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)
            tm.begin()
            assert conn.root()["x"] == 1
            conn.root()["x"] = 3
            tm.commit()
            conn.close()
        finally:
            db.close()


def test_per_call_deadline_names_the_call_and_the_server(server):
    with FaultProxy(server.addr) as proxy:
        storage = ZEO.client(proxy.addr, wait_timeout=5)
        try:
            proxy.hold()  # the link stays open but nothing gets through
            for call in (lambda: storage.ping(timeout=0.3),
                         lambda: storage.server_status(timeout=0.3),
                         lambda: storage.pack(timeout=0.3),
                         lambda: storage.undoLog(0, 10, timeout=0.3)):
                with pytest.raises(ClientDisconnected, match=r"no reply to \w+ from .* 0\.3 s"):
                    call()
            proxy.release()
            storage.ping(timeout=10)  # the connection is still usable
        finally:
            storage.close()
