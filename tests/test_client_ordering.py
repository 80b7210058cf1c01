"""Ordering guarantees the client gives ZODB (zeo-facts §4.4)."""

from __future__ import annotations

import threading

import pytest
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData

import ZEO

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def addr():
    address, stop = ZEO.server()
    yield address
    stop()


def test_last_transaction_waits_for_the_commit_callback(addr):
    # While ZODB's tpc_finish callback runs (recording invalidations for the DB's other
    # connections), another thread asking lastTransaction() -- as a connection being opened
    # does -- must wait, then get the new tid: never the new tid before the invalidations.
    storage = ZEO.client(addr)
    try:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(storage.new_oid(), b"\0" * 8, b"data", "", txn)
        storage.tpc_vote(txn)
        seen = []

        def callback(tid):
            reader = threading.Thread(target=lambda: seen.append(storage.lastTransaction()))
            reader.start()
            reader.join(0.3)
            assert reader.is_alive(), "lastTransaction() did not wait for the callback"
            seen.append(("callback done", tid))
            callback.reader = reader

        tid = storage.tpc_finish(txn, callback)
        callback.reader.join(10)
        assert seen == [("callback done", tid), tid]
    finally:
        storage.close()


def test_new_connection_never_sees_a_commit_without_its_invalidations(addr):
    # Pooled connections with cached objects get the invalidations of local commits: a and
    # b always change together, so a reader must never see them differ. (Single-threaded: the
    # interleaving above is covered by the previous test and by ZODB's racetest.)
    db = ZEO.DB(addr)
    try:
        with db.transaction() as conn:
            conn.root.a = PersistentMapping(n=0)
            conn.root.b = PersistentMapping(n=0)
        reader = db.open()
        reader.root.a["n"], reader.root.b["n"]  # both cached in this connection
        reader.close()  # back to the pool, caches kept
        for i in range(1, 30):
            with db.transaction() as conn:
                conn.root.a["n"] = conn.root.b["n"] = i
            reader = db.open()
            assert (reader.root.a["n"], reader.root.b["n"]) == (i, i)
            reader.close()
    finally:
        db.close()
