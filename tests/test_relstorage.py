"""Our server in front of RelStorage on a real PostgreSQL (started by the tests).

What a ZEO user relies on, checked through ``runzeo -C zeo.conf`` with a ``<relstorage>``
section: commits seen by other clients (pushed invalidations), conflicts reported as
``ConflictError`` and resolvable ones resolved, cache verification after a reconnection,
reads at old snapshots, undo, pack, and a clear refusal of history-free databases.
"""

from __future__ import annotations

import pytest
import transaction
from BTrees.Length import Length
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

import ZEO
from support.contention import bump_lengths
from support.servers import start_server
from support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def rs_server(relstorage_conf, tmp_path):
    """``rs_server(zeo_extra="", **relstorage_conf options)``: runzeo on RelStorage."""
    servers = []

    def make(zeo_extra="", name="s", **kw):
        srv = start_server("ours", tmp_path / name, relstorage_conf(**kw), zeo_extra)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


def test_commits_reach_other_clients(rs_server, closing):
    srv = rs_server()
    db1 = closing(ZEO.DB(srv.addr))
    db2 = closing(ZEO.DB(srv.addr))
    with db1.transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=1)
    c2 = db2.open()
    # Without server_sync a client sees a commit once its invalidation arrives: soon.
    wait_until(lambda: (c2.transaction_manager.begin(), "x" in c2.root())[1], timeout=10)
    assert c2.root()["x"]["n"] == 1
    with db1.transaction() as conn:
        conn.root()["x"]["n"] = 2
    # The invalidation is pushed: the other client's next transaction sees the change.
    wait_until(lambda: (c2.transaction_manager.begin(), c2.root()["x"]["n"])[1] == 2,
               timeout=10)
    c2.close()


def test_a_snapshot_keeps_reading_its_revision(rs_server, closing):
    srv = rs_server()
    db1 = closing(ZEO.DB(srv.addr))
    # server_sync: a new transaction asks the server, so it sees every commit made before.
    db2 = closing(ZEO.DB(srv.addr, server_sync=True))
    with db1.transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=1)
        conn.root()["y"] = PersistentMapping(n=1)
    tm = transaction.TransactionManager()
    reader = db2.open(tm)
    tm.begin()  # with server_sync, begin() is what asks the server
    assert reader.root()["x"]["n"] == 1  # the reader's snapshot starts here
    for n in range(2, 5):
        with db1.transaction() as conn:
            conn.root()["x"]["n"] = n
            conn.root()["y"]["n"] = n
    # "y" was never loaded by the reader: it reads the revision of its snapshot (loadBefore).
    assert reader.root()["y"]["n"] == 1
    tm.begin()
    assert reader.root()["y"]["n"] == 4 and reader.root()["x"]["n"] == 4
    reader.close()


def test_write_conflicts_are_conflict_errors(rs_server, closing):
    srv = rs_server()
    db1 = closing(ZEO.DB(srv.addr))
    db2 = closing(ZEO.DB(srv.addr, server_sync=True))
    with db1.transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=0)
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db1.open(tm1), db2.open(tm2)
    tm2.begin()  # server_sync: sees the commit above
    c1.root()["x"]["n"] = 1
    c2.root()["x"]["n"] = 2
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    tm2.begin()
    assert c2.root()["x"]["n"] == 1
    c1.close()
    c2.close()


def test_resolvable_conflicts_are_resolved(rs_server, closing):
    srv = rs_server()
    db = closing(ZEO.DB(srv.addr))
    with db.transaction() as conn:
        conn.root()["len"] = Length()
    errors = bump_lengths([db] * 4, "len", 25)
    assert not errors
    with db.transaction() as conn:
        assert conn.root()["len"]() == 100
    assert srv.proc.poll() is None


def test_cache_verification_after_a_server_restart(rs_server, closing, tmp_path):
    srv = rs_server()
    cache = str(tmp_path / "client.zec")
    db = closing(ZEO.DB(srv.addr, cache=cache, wait_timeout=30))
    with db.transaction() as conn:
        conn.root()["a"] = PersistentMapping(n=1)
        conn.root()["b"] = PersistentMapping(n=1)
    db.close()
    # Another client changes "a" while the first is away.
    other = ZEO.DB(srv.addr)
    with other.transaction() as conn:
        conn.root()["a"]["n"] = 2
    other.close()
    db = closing(ZEO.DB(srv.addr, cache=cache, wait_timeout=30))
    with db.transaction() as conn:
        assert conn.root()["a"]["n"] == 2 and conn.root()["b"]["n"] == 1


def test_undo_and_pack(rs_server, closing):
    srv = rs_server()
    db = closing(ZEO.DB(srv.addr))
    with db.transaction() as conn:
        conn.root()["x"] = 1
    with db.transaction() as conn:
        conn.root()["x"] = 2
    assert db.supportsUndo()
    log = db.undoLog(0, 10)
    db.undo(log[0]["id"])
    transaction.commit()
    with db.transaction() as conn:
        assert conn.root()["x"] == 1
    db.pack()
    with db.transaction() as conn:
        assert conn.root()["x"] == 1


def test_history_free_is_refused_with_the_key_to_change(relstorage_conf, tmp_path):
    with pytest.raises(RuntimeError, match="keep-history true"):
        start_server("ours", tmp_path / "hf", relstorage_conf(extra="  keep-history false\n"))


@pytest.mark.parametrize("shared", [True, False], ids=["shared-blob-dir", "blobs-in-db"])
def test_blobs(rs_server, closing, tmp_path, shared):
    from ZODB.blob import Blob

    srv = rs_server(blob_dir=str(tmp_path / "server-blobs"), shared_blob_dir=shared)
    db = closing(ZEO.DB(srv.addr, blob_dir=str(tmp_path / "client-blobs")))
    payload = b"x" * (3 << 20) + b"end"
    with db.transaction() as conn:
        conn.root()["b"] = Blob(payload)
    other = closing(ZEO.DB(srv.addr, blob_dir=str(tmp_path / "other-blobs")))
    with other.transaction() as conn:
        with conn.root()["b"].open() as f:
            assert f.read() == payload
        with conn.root()["b"].open("w") as f:
            f.write(b"second")

    def reads_second() -> bool:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        try:
            with conn.root()["b"].open() as f:
                return f.read() == b"second"
        finally:
            tm.abort()
            conn.close()

    wait_until(reads_second, timeout=10)


def test_relstorage_never_resolves_conflicts_itself(rs_server, closing):
    """A store that claims an existing object is new reaches RelStorage's own conflict
    resolution, which would import whatever module a record names: the server makes it
    refuse, so the client gets a ConflictError and the object is untouched."""
    from relstorage.storage.tpc.vote import _CachedConflictResolver

    from support.wire import RemoteError, WireClient

    srv = rs_server()
    db = closing(ZEO.DB(srv.addr))
    with db.transaction() as conn:
        conn.root()["len"] = length = Length()
    oid = length._p_oid
    data = db.storage.load(oid)[0]
    with WireClient(srv.addr) as c:
        c.call("register", "1", False)
        c.async_call("tpc_begin", 1, b"", b"", {}, None, " ")
        c.async_call("storea", oid, b"\0" * 8, data, 1)
        with pytest.raises(RemoteError) as e:
            c.call("vote", 1)
        assert e.value.args[0].endswith("ConflictError"), e.value
        c.call("tpc_abort", 1)
    with db.transaction() as conn:
        assert conn.root()["len"]() == 0
    # In this process too, once a server has served RelStorage:
    from ZEO.server.mvcc import _refuse_storage_resolution

    _refuse_storage_resolution()
    with pytest.raises(ConflictError):
        _CachedConflictResolver.tryToResolveConflict(None, oid, b"1" * 8, b"2" * 8, data)


def test_a_commit_racing_in_between_is_told_apart(postgres):
    """The store-time check saw the revision current then; another writer commits the same
    object before this vote: the vote raises VoteRaced (the commit path votes again)."""
    import ZODB.config
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import z64

    from support.postgres import relstorage_section
    from ZEO.server.mvcc import MVCCStorage, VoteRaced

    conf = relstorage_section(postgres.create_database()).replace("<relstorage 1>",
                                                                  "<relstorage>")
    base = ZODB.config.storageFromString(conf)
    other = base.new_instance()
    served = MVCCStorage(base)
    try:
        def commit(storage, serial, data):
            t = TransactionMetaData()
            storage.tpc_begin(t)
            storage.store(z64, serial, data, "", t)
            storage.tpc_vote(t)
            return storage.tpc_finish(t)

        from ZODB.tests.MinPO import MinPO
        from ZODB.tests.StorageTestBase import zodb_pickle

        first = commit(served, z64, zodb_pickle(MinPO(1)))
        t = TransactionMetaData()
        served.tpc_begin(t)
        served.store(z64, first, zodb_pickle(MinPO(2)), "", t)  # checked: current
        other.sync()
        other.poll_invalidations()
        commit(other, first, zodb_pickle(MinPO(3)))  # lands before our vote
        with pytest.raises(VoteRaced):
            served.tpc_vote(t)
        served.tpc_abort(t)
    finally:
        other.release()
        served.close()
