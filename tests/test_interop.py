"""Interoperability with the real ZEO 6.2 (issue 6), in pickle (Z5) and msgpack (M5).

* the real ZEO 6.2 ClientStorage (in its own venv, driven by ``support/ref_scripts/driver.py``)
  against OUR server: commit/load, invalidations, conflict resolution, undo, iteration, history,
  pack, and the real ``zeo-nagios`` and ``zeopack``;
* a mixed fleet: a real client and our ClientStorage on one of our servers;
* our ClientStorage against the real server: invalidations, conflicts, undo, iteration, pack.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import transaction
from BTrees.Length import Length
from ZODB.POSException import ConflictError
from ZODB.utils import z64

import ZEO
from support.ref_scripts import RefDriver, RefError
from support.refzeo import ref_bin
from support.servers import filestorage_conf, start_server

CODECS = {"pickle": "", "msgpack": "msgpack true"}


def _start(kind: str, directory, codec: str):
    return start_server(kind, directory, filestorage_conf(directory / "Data.fs"),
                        zeo_extra=CODECS[codec])


@pytest.fixture(params=list(CODECS))
def codec(request) -> str:
    return request.param


#: What our server serves to the real client: (codec, storage).
SERVED = [("pickle", "filestorage"), ("msgpack", "filestorage"), ("pickle", "relstorage")]


@pytest.fixture(params=SERVED, ids=["-".join(p) for p in SERVED])
def ours(request, tmp_path):
    codec, storage = request.param
    if storage == "relstorage":
        conf = request.getfixturevalue("relstorage_conf")()
        srv = start_server("ours", tmp_path / "ours", conf, zeo_extra=CODECS[codec])
    else:
        srv = _start("ours", tmp_path / "ours", codec)
    srv.codec = codec
    srv.storage = storage
    yield srv
    srv.stop()


@pytest.fixture
def ref_server(tmp_path, codec):
    srv = _start("ref", tmp_path / "ref", codec)
    srv.codec = codec
    yield srv
    srv.stop(timeout=5)  # ZEO 6.2 now and then ignores SIGTERM (zeo-facts §11): then SIGKILL


@pytest.fixture
def real():
    """A reference python with real ZEO 6.2 clients."""
    with RefDriver() as d:
        yield d


def addr_arg(srv):
    return srv.addr if isinstance(srv.addr, str) else list(srv.addr)


def expected_protocol(srv) -> str:
    return "M5" if srv.codec == "msgpack" else "Z5"


def history_after_pack(srv, last: str) -> list[str]:
    """What ``history`` lists after a pack to now: the current revision; RelStorage lists
    no revision of a packed transaction (its own behaviour, docs/relstorage.rst)."""
    return [] if getattr(srv, "storage", None) == "relstorage" else [last]


# --------------------------------------------------------------------------------------------
# Real ZEO 6.2 clients against our server


def test_real_client_open_commit_load(ours, real):
    info = real("open", name="a", addr=addr_arg(ours))
    assert info["last_tid"] != z64.hex()  # ZODB.DB created the root
    assert info["protocol"] in (expected_protocol(ours), None)
    assert {"IStorageUndoable", "IStorageIteration", "IStorageRestoreable",
            "IExternalGC"} <= set(info["interfaces"])
    tid = real("set", name="a", items={"x": 1, "s": "text", "l": [1, 2]})
    assert real("get", name="a", keys=["x", "s", "l"]) == {"x": 1, "s": "text", "l": [1, 2]}
    # a second, fresh client reads it from the server
    info = real("open", name="b", addr=addr_arg(ours))
    assert info["last_tid"] == tid
    assert real("get", name="b", keys=["x", "s"]) == {"x": 1, "s": "text"}
    assert real("load_before", name="b", oid=z64.hex(), tid="7fffffffffffffff")[1] == tid
    if getattr(ours, "storage", None) != "relstorage":  # RelStorage's len is an estimate
        assert real("info", name="b")["len"] >= 1
    status = real("server_status", name="b")
    assert status["connections"] == 2
    assert status["last-transaction"] == tid
    new = real("new_oid", name="b")
    assert int(new, 16) > 0


def test_real_clients_invalidate_each_other(ours, real):
    real("open", name="a", addr=addr_arg(ours))
    real("open", name="b", addr=addr_arg(ours))
    real("wait_tid", name="b", tid=real("set", name="a", items={"x": 1}))
    for i in range(2, 6):
        # the reader has x cached at its previous value; the writer commits; the reader must
        # get the invalidation and then read the new value
        writer, reader = ("a", "b") if i % 2 == 0 else ("b", "a")
        assert real("get", name=reader, keys=["x"]) == {"x": i - 1}
        tid = real("set", name=writer, items={"x": i})
        real("wait_tid", name=reader, tid=tid)
        assert real("get", name=reader, keys=["x"]) == {"x": i}


def test_real_client_conflict_resolution_on_our_server(ours, real):
    real("open", name="a", addr=addr_arg(ours))
    real("open", name="b", addr=addr_arg(ours))
    tid = real("make_length", name="a", key="n")
    real("wait_tid", name="b", tid=tid)
    real("begin", name="a")
    real("begin", name="b")
    real("length_change", name="a", key="n", delta=1)
    real("length_change", name="b", key="n", delta=2)
    t1 = real("commit", name="a")
    t2 = real("commit", name="b")  # conflicts with a, resolved by the server (BTrees.Length)
    assert t2 > t1
    real("wait_tid", name="a", tid=t2)
    assert real("get", name="a", keys=["n"]) == {"n": 3}
    assert real("get", name="b", keys=["n"]) == {"n": 3}


def test_real_client_unresolvable_conflict(ours, real):
    real("open", name="a", addr=addr_arg(ours))
    real("open", name="b", addr=addr_arg(ours))
    tid = real("set", name="a", items={"x": 0})
    real("wait_tid", name="b", tid=tid)
    real("begin", name="a")
    real("begin", name="b")
    real("get", name="b", keys=["x"])
    real("set_nocommit", name="a", items={"x": 1})
    real("set_nocommit", name="b", items={"x": 2})
    real("commit", name="a")
    with pytest.raises(RefError) as info:
        real("commit", name="b")
    assert info.value.class_name == "ZODB.POSException.ConflictError"
    assert real("get", name="b", keys=["x"]) == {"x": 1}


def test_real_client_undo(ours, real):
    real("open", name="a", addr=addr_arg(ours))
    real("open", name="b", addr=addr_arg(ours))
    real("set", name="a", items={"x": 1}, description="one")
    real("set", name="a", items={"x": 2}, description="two")
    log = real("undo_log", name="a")
    assert [d["description"] for d in log[:2]] == ["two", "one"]
    tid = real("undo", name="a", undo_id=log[0]["id"])
    assert real("get", name="a", keys=["x"]) == {"x": 1}
    real("wait_tid", name="b", tid=tid)
    assert real("get", name="b", keys=["x"]) == {"x": 1}


def test_real_client_iteration(ours, real):
    real("open", name="a", addr=addr_arg(ours))
    tids = [real("set", name="a", items={"x": i}, description=f"t{i}") for i in range(3)]
    txns = real("iterate", name="a")
    # the first transaction is ZODB's root creation
    assert [t["tid"] for t in txns[-3:]] == tids
    assert [t["description"] for t in txns[-3:]] == ["t0", "t1", "t2"]
    assert all(t["records"] and t["records"][0][0] == z64.hex() for t in txns)
    assert [t["tid"] for t in real("iterate", name="a", start=tids[1])] == tids[1:]
    assert [t["tid"] for t in real("iterate", name="a", start=tids[0], stop=tids[1])] == \
        tids[:2]


def test_real_client_history_and_pack(ours, real):
    real("open", name="a", addr=addr_arg(ours))
    for i in range(4):
        last = real("set", name="a", items={"x": i})
    history = real("history", name="a")
    assert history[0]["tid"] == last
    assert len(history) == 5  # root creation + 4 commits
    time.sleep(0.01)  # pack time must be after the last commit's timestamp
    real("pack", name="a")
    history = real("history", name="a")
    assert [h["tid"] for h in history] == history_after_pack(ours, last)
    assert real("get", name="a", keys=["x"]) == {"x": 3}


def test_real_zeo_nagios_on_our_server(ours, real, tmp_path):
    nagios = str(ref_bin("zeo-nagios"))
    address = ours.addr if isinstance(ours.addr, str) else f"{ours.addr[0]}:{ours.addr[1]}"
    out = subprocess.run([nagios, address], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (1, "Empty storage '1'"), out
    real("open", name="a", addr=addr_arg(ours))
    real("set", name="a", items={"x": 1})
    out = subprocess.run([nagios, "-m", address], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    assert out.stdout.startswith("OK|")
    assert "connections=1" in out.stdout and "active_txns=0" in out.stdout
    status = tmp_path / "nagios-status"
    for _ in range(2):
        out = subprocess.run([nagios, "-m", "-s", str(status), address],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out
    assert "commits=" in out.stdout and "loads=" in out.stdout


def test_real_zeo_nagios_cannot_connect(tmp_path):
    from support.servers import free_port

    out = subprocess.run([str(ref_bin("zeo-nagios")), f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout.startswith("Can't connect")


def test_real_zeopack_on_our_server(ours, real):
    real("open", name="a", addr=addr_arg(ours))
    for i in range(3):
        last = real("set", name="a", items={"x": i})
    assert len(real("history", name="a")) == 4
    time.sleep(0.01)
    address = ours.addr if isinstance(ours.addr, str) else f"{ours.addr[0]}:{ours.addr[1]}"
    args = ["-u", address] if isinstance(ours.addr, str) else [address]
    out = subprocess.run([str(ref_bin("zeopack")), *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out
    assert [h["tid"] for h in real("history", name="a")] == history_after_pack(ours, last)


# --------------------------------------------------------------------------------------------
# Mixed fleet on our server: a real ZEO 6.2 client and our ClientStorage


def _wait_last_tid(storage, tid: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while storage.lastTransaction() < tid:
        assert time.monotonic() < deadline, "no invalidation"
        time.sleep(0.01)


@pytest.mark.parametrize("server_sync", [False, True])
def test_mixed_fleet_sees_each_others_commits(ours, real, server_sync):
    real("open", name="r", addr=addr_arg(ours), server_sync=server_sync)
    db = ZEO.DB(ours.addr, wait_timeout=30, server_sync=server_sync)
    try:
        storage = db.storage
        assert storage.protocol_version == expected_protocol(ours).encode()
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        tid = bytes.fromhex(real("set", name="r", items={"n": 0}))
        for i in range(1, 9):
            if i % 2:  # ours writes after seeing the real client's last commit
                _wait_last_tid(storage, tid)
                tm.begin()
                assert conn.root()["n"] == i - 1, "stale read in our client"
                conn.root()["n"] = i
                tm.commit()
                tid = storage.lastTransaction()
            else:
                real("wait_tid", name="r", tid=tid.hex())
                assert real("get", name="r", keys=["n"]) == {"n": i - 1}, "stale read in ZEO"
                tid = bytes.fromhex(real("set", name="r", items={"n": i}))
        _wait_last_tid(storage, tid)
        tm.begin()
        assert conn.root()["n"] == 8
        conn.close()
    finally:
        db.close()


def test_mixed_fleet_conflict_resolution(ours, real):
    db = ZEO.DB(ours.addr, wait_timeout=30)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()["n"] = Length()
        tm.commit()
        tid = db.storage.lastTransaction()
        real("open", name="r", addr=addr_arg(ours))
        real("wait_tid", name="r", tid=tid.hex())
        tm.begin()
        conn.root()["n"].change(5)
        real("begin", name="r")
        real("length_change", name="r", key="n", delta=7)
        real("commit", name="r")
        tm.commit()  # resolved by the server
        real("wait_tid", name="r", tid=db.storage.lastTransaction().hex())
        assert real("get", name="r", keys=["n"]) == {"n": 12}
        tm.begin()
        assert conn.root()["n"]() == 12
        conn.close()
    finally:
        db.close()


# --------------------------------------------------------------------------------------------
# Our ClientStorage against the real ZEO 6.2 server


@pytest.fixture
def our_dbs(ref_server):
    dbs = [ZEO.DB(ref_server.addr, wait_timeout=30) for _ in range(2)]
    yield dbs
    for db in dbs:
        db.close()


def test_our_client_on_real_server_protocol(ref_server, our_dbs):
    assert our_dbs[0].storage.protocol_version == expected_protocol(ref_server).encode()


def test_our_clients_invalidate_each_other_on_real_server(our_dbs):
    a, b = our_dbs
    tma, tmb = transaction.TransactionManager(), transaction.TransactionManager()
    ca, cb = a.open(tma), b.open(tmb)
    ca.root()["x"] = 1
    tma.commit()
    _wait_last_tid(b.storage, a.storage.lastTransaction())
    for i in range(2, 6):
        writer, reader = (ca, cb) if i % 2 == 0 else (cb, ca)
        wtm, rtm = (tma, tmb) if i % 2 == 0 else (tmb, tma)
        rtm.begin()
        assert reader.root()["x"] == i - 1
        writer.root()["x"] = i
        wtm.commit()
        tid = writer.db().storage.lastTransaction()
        _wait_last_tid(reader.db().storage, tid)
        rtm.begin()
        assert reader.root()["x"] == i
    ca.close()
    cb.close()


def test_our_clients_conflicts_on_real_server(our_dbs):
    a, b = our_dbs
    tma, tmb = transaction.TransactionManager(), transaction.TransactionManager()
    ca, cb = a.open(tma), b.open(tmb)
    ca.root()["n"] = Length()
    ca.root()["x"] = 0
    tma.commit()
    _wait_last_tid(b.storage, a.storage.lastTransaction())
    tmb.begin()
    cb.root()["n"].change(2)
    cb.root()["x"] = 2
    ca.root()["n"].change(1)
    ca.root()["x"] = 1
    tma.commit()
    with pytest.raises(ConflictError):  # root (a PersistentMapping) cannot be resolved
        tmb.commit()
    tmb.abort()
    _wait_last_tid(b.storage, a.storage.lastTransaction())
    tma.begin()
    tmb.begin()
    cb.root()["n"].change(2)
    ca.root()["n"].change(10)
    tma.commit()
    tmb.commit()  # Length: resolved by the real server
    _wait_last_tid(a.storage, b.storage.lastTransaction())
    tma.begin()
    assert ca.root()["n"]() == 13  # 1 + 10 + 2 (b's first change was aborted)
    ca.close()
    cb.close()


def test_our_client_undo_iteration_pack_on_real_server(our_dbs):
    a, b = our_dbs
    tm = transaction.TransactionManager()
    conn = a.open(tm)
    tids = []
    for i in range(3):
        conn.root()["x"] = i
        tm.get().note(f"t{i}")
        tm.commit()
        tids.append(a.storage.lastTransaction())
    # iteration
    # (records must be read while the iterator is live: like ZEO's, the server forgets an
    # exhausted iterator)
    txns = [(t.tid, t.description, [r.oid for r in t]) for t in a.storage.iterator()]
    assert [t[0] for t in txns[-3:]] == tids
    assert [t[1] for t in txns[-3:]] == [b"t0", b"t1", b"t2"]
    assert all(t[2] == [z64] for t in txns)
    # undo the last one; the other client sees it
    log = a.undoLog(0, 5)
    assert log[0]["description"] == "t2"  # ZODB.DB.undoLog decodes to text
    a.undo(log[0]["id"], tm.get())
    tm.commit()
    undo_tid = a.storage.lastTransaction()
    tm.begin()
    assert conn.root()["x"] == 1
    _wait_last_tid(b.storage, undo_tid)
    tmb = transaction.TransactionManager()
    cb = b.open(tmb)
    assert cb.root()["x"] == 1
    # history and pack
    assert len(a.storage.history(z64, size=100)) == 5
    time.sleep(0.01)
    a.pack(time.time())
    assert [h["tid"] for h in a.storage.history(z64, size=100)] == [undo_tid]
    tmb.begin()
    assert cb.root()["x"] == 1
    conn.close()
    cb.close()
