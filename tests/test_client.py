"""ClientStorage end to end against real server processes (the reference ZEO 6.2 and ours).

Every test starts ``runzeo -C zeo.conf`` as a subprocess on a fresh FileStorage and talks to it
over TCP, with a real ``ZODB.DB`` where the behaviour concerns ZODB.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.event
from persistent.mapping import PersistentMapping
from ZODB.POSException import POSKeyError, ReadOnlyError
from ZODB.utils import p64, z64

import ZEO
from support.servers import free_port
from support.waiting import wait_until
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZEO.interfaces import StaleCache

pytestmark = pytest.mark.timeout(120)

KINDS = ["ref", "ours"]
CODECS = {"pickle": "", "msgpack": "msgpack true"}


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(params=list(CODECS))
def codec(request):
    return request.param


def commit_value(db, key, value):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        conn.root()[key] = value
        tm.commit()
    finally:
        conn.close()
    return db.storage.lastTransaction()


def read_value(db, key, convert=lambda v: v):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        return convert(conn.root().get(key))
    finally:
        conn.close()


def test_open_commit_reopen(make_server_process, closing, kind, codec):
    srv = make_server_process(kind, CODECS[codec])
    db = closing(ZEO.DB(srv.addr))
    assert db.storage.is_connected()
    assert db.storage.protocol_version == (b"M5" if codec == "msgpack" else b"Z5")
    tid = commit_value(db, "x", PersistentMapping(a=1))
    assert db.storage.lastTransaction() == tid != z64
    db.close()

    db2 = closing(ZEO.DB(srv.addr))
    assert db2.storage.lastTransaction() == tid
    assert read_value(db2, "x", dict) == {"a": 1}
    assert len(db2.storage) >= 2
    assert db2.storage.getSize() > 0
    assert db2.storage.getName().endswith("(connected)")
    assert db2.storage.sortKey().startswith("1:")


def test_invalidations_reach_the_other_client(make_server_process, closing, kind, codec):
    srv = make_server_process(kind, CODECS[codec])
    db1 = closing(ZEO.DB(srv.addr))
    db2 = closing(ZEO.DB(srv.addr))
    commit_value(db1, "x", 1)
    wait_until(lambda: db2.storage.lastTransaction() == db1.storage.lastTransaction(),
               what="first invalidation")
    assert read_value(db2, "x") == 1

    # A connection with the old state loaded sees the new value after the invalidation.
    tm2 = transaction.TransactionManager()
    c2 = db2.open(tm2)
    assert c2.root()["x"] == 1
    tid = commit_value(db1, "x", 2)
    wait_until(lambda: db2.storage.lastTransaction() == tid, what="second invalidation")
    tm2.begin()
    assert c2.root()["x"] == 2
    c2.close()
    # Cached records: the current record of the root now starts at tid.
    assert db2.storage._cache.load(z64)[1] == tid


def test_load_before_and_history(make_server_process, closing, kind):
    srv = make_server_process(kind)
    db = closing(ZEO.DB(srv.addr))
    t1 = commit_value(db, "x", 1)
    t2 = commit_value(db, "x", 2)
    st = db.storage
    data, start, end = st.loadBefore(z64, t2)
    assert (start, end) == (t1, t2)
    assert st.loadBefore(z64, p64(1)) is None
    assert st.load(z64)[1] == t2
    assert st.loadSerial(z64, t1) == data
    assert [h["tid"] for h in st.history(z64, 2)] == [t2, t1]
    with pytest.raises(POSKeyError):
        st.load(p64(12345))


def test_prefetch_fills_the_cache(make_server_process, closing, kind):
    srv = make_server_process(kind)
    db = closing(ZEO.DB(srv.addr))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    for i in range(5):
        conn.root()[i] = PersistentMapping(i=i)
    tm.commit()
    oids = [conn.root()[i]._p_oid for i in range(5)]
    conn.close()
    tid = db.storage.lastTransaction()

    st = closing(ClientStorage(srv.addr))
    assert all(st._cache.load(oid) is None for oid in oids)
    loads = st.server_status()["loads"]
    st.prefetch(oids, p64(int.from_bytes(tid, "big") + 1))
    st.ping()  # replies come in order: the prefetches were handled before this one
    assert all(st._cache.load(oid) is not None for oid in oids)
    for oid in oids:
        st.load(oid)
    assert st.server_status()["loads"] == loads + len(oids)


def test_identical_loads_are_collapsed(make_server_process, closing, kind):
    srv = make_server_process(kind)
    st = closing(ClientStorage(srv.addr))
    conn = st._conn
    release = threading.Event()
    # Hold the reader thread inside a reply hook, so later replies stay pending.
    blocker = conn.call("ping", on_reply=lambda v: release.wait(10))
    try:
        a = st._prefetcher.request(conn, z64, p64(2))
        b = st._prefetcher.request(conn, z64, p64(2))
        c = st._prefetcher.request(conn, z64, p64(3))
        assert a is b and a is not c
    finally:
        release.set()
    blocker.wait(10)
    with pytest.raises(POSKeyError):
        a.wait(10)
    with pytest.raises(POSKeyError):
        b.wait(10)


def test_new_oids_are_ascending_and_unique(make_server_process, closing, kind):
    srv = make_server_process(kind)
    st = closing(ClientStorage(srv.addr))
    oids = [st.new_oid() for _ in range(150)]
    assert oids == sorted(oids) and len(set(oids)) == 150


def test_never_connected_and_wait_timeout(closing):
    addr = ("127.0.0.1", free_port())
    st = closing(ClientStorage(addr, wait=False))
    assert not st.is_connected()
    with pytest.raises(ClientDisconnected, match="never connected"):
        st.load(z64)
    with pytest.raises(ClientDisconnected, match="timed out waiting for connection"):
        ClientStorage(addr, wait_timeout=0.3)


def test_pending_call_fails_when_server_dies(make_server_process, closing, kind):
    srv = make_server_process(kind)
    st = closing(ClientStorage(srv.addr, wait_timeout=1))
    srv.send_signal(signal.SIGSTOP)
    result = []

    def load():
        try:
            st.loadBefore(p64(77), p64(99))
        except Exception as e:
            result.append(e)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()  # waiting on a stopped server
    srv.proc.kill()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(result[0], ClientDisconnected)
    wait_until(lambda: not st.is_connected(), what="disconnect noticed")


def test_disconnect_poisons_transaction_then_reconnects(make_server_process, closing, kind,
                                                        tmp_path):
    srv = make_server_process(kind)
    db = closing(ZEO.DB(srv.addr, wait_timeout=20))
    commit_value(db, "x", 1)
    st = db.storage
    txn = transaction.TransactionManager().get()
    from ZODB.Connection import TransactionMetaData

    meta = TransactionMetaData()
    st.tpc_begin(meta)
    st.store(st.new_oid(), z64, b"data", "", meta)
    srv.stop()
    wait_until(lambda: not st.is_connected(), what="disconnect")
    with pytest.raises(ClientDisconnected):
        st.tpc_vote(meta)
    st.tpc_abort(meta)
    txn.abort()

    srv2 = make_server_process(kind, addr=srv.addr, name="s")  # same file, same address
    wait_until(st.is_connected, timeout=20, what="reconnect")
    assert read_value(db, "x") == 1
    commit_value(db, "x", 3)
    assert read_value(db, "x") == 3
    srv2.stop()


def test_read_only(make_server_process, closing, kind):
    srv = make_server_process(kind)
    db = closing(ZEO.DB(srv.addr))
    commit_value(db, "x", 1)
    ro = closing(ClientStorage(srv.addr, read_only=True))
    assert ro.isReadOnly()
    from ZODB.Connection import TransactionMetaData

    with pytest.raises(ReadOnlyError):
        ro.tpc_begin(TransactionMetaData())
    with pytest.raises(ReadOnlyError):
        ro.new_oid()
    assert ro.load(z64)[1] == db.storage.lastTransaction()

    ro_srv = make_server_process(kind, "read-only true", name="ro")
    with pytest.raises(ClientDisconnected):
        ClientStorage(ro_srv.addr, wait_timeout=0.5)
    fb = closing(ClientStorage(ro_srv.addr, read_only_fallback=True))
    assert fb.isReadOnly()


def test_cache_verification_after_disconnect(make_server_process, closing, kind, monkeypatch):
    """Changes made while a client was away: a covered gap invalidates just those oids, a gap
    beyond the server's invalidation queue drops the cache and publishes StaleCache."""
    srv = make_server_process(kind, "invalidation-queue-size 2")
    writer = closing(ZEO.DB(srv.addr))
    tm = transaction.TransactionManager()
    c = writer.open(tm)
    c.root()["a"] = PersistentMapping(v=0)
    c.root()["b"] = PersistentMapping(v=0)
    tm.commit()
    oid_a, oid_b = c.root()["a"]._p_oid, c.root()["b"]._p_oid

    st = closing(ClientStorage(srv.addr, wait_timeout=20))
    wait_until(lambda: st.lastTransaction() == writer.storage.lastTransaction())
    for oid in (oid_a, oid_b):
        st.load(oid)

    def away_while(n_commits):
        st.new_addr(("127.0.0.1", free_port()))  # nothing listens there
        st._conn.close()
        wait_until(lambda: not st.is_connected(), what="disconnect")
        for i in range(n_commits):
            c.root()["a"]["v"] = i + 1
            tm.commit()
        st.new_addr(srv.addr)
        wait_until(st.is_connected, timeout=20, what="reconnect")

    away_while(1)
    assert st.lastTransaction() == writer.storage.lastTransaction()
    assert st._cache.load(oid_a) is None  # invalidated
    assert st._cache.load(oid_b) is not None  # untouched, kept

    events = []
    # ZODB.event.notify is ZODB's event hook (zope.event's notify when installed).
    monkeypatch.setattr(ZODB.event, "notify", events.append)
    away_while(4)  # more than the queue holds
    assert any(isinstance(e, StaleCache) and e.storage is st for e in events)
    assert st._cache.load(oid_b) is None
    assert st.lastTransaction() == writer.storage.lastTransaction()
    assert st.load(oid_a)[1] == writer.storage.lastTransaction()


def test_zodb_db_uses_client_as_is(make_server_process, closing, kind):
    srv = make_server_process(kind)
    st = ClientStorage(srv.addr)
    db = closing(ZODB.DB(st))
    conn = db.open()
    conn.root()["n"] = 0
    transaction.commit()
    for _i in range(3):
        conn.root()["n"] += 1
        transaction.commit()
    assert read_value(db, "n") == 3
    undo_log = db.undoLog(0, 10)
    assert len(undo_log) == 5
    db.undo(undo_log[0]["id"])
    transaction.commit()
    transaction.begin()
    assert read_value(db, "n") == 2
    conn.close()


def test_unix_socket_and_address_list(make_server_process, closing, kind, tmp_path):
    import ZODB.interfaces

    path = str(tmp_path / "zeo.sock")
    make_server_process(kind, addr=path)
    dead = ("127.0.0.1", free_port())
    st = closing(ClientStorage([dead, path]))  # the dead address is skipped
    assert st.is_connected() and st._server_addr == path
    assert ZODB.interfaces.IStorageUndoable.providedBy(st)
    assert ZODB.interfaces.IStorageIteration.providedBy(st)
    assert ZODB.interfaces.IMultiCommitStorage.providedBy(st)
    db = closing(ZODB.DB(st))
    tid = commit_value(db, "x", 1)
    assert [t.tid for t in st.iterator()][-1] == tid


def test_socket_transport_sends_parts_in_order_through_partial_writes() -> None:
    """Vectored sends of many parts, some far larger than the socket buffer, arrive intact."""
    import os
    import socket

    from ZEO.client.connection import SocketTransport

    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    parts = [os.urandom(n) for n in (0, 5, 3_000_000, 0, 17, 200_000)]
    parts += [bytes([i % 256]) * (i % 7) for i in range(3000)]  # more parts than IOV_MAX
    expected = b"".join(parts)
    received = bytearray()

    def read() -> None:
        while len(received) < len(expected):
            chunk = b.recv(65536)
            if not chunk:
                return
            received.extend(chunk)
            time.sleep(0.0005 if len(received) < 100_000 else 0)  # force partial writes

    reader = threading.Thread(target=read)
    reader.start()
    try:
        SocketTransport(a).sendall_parts(parts)
        reader.join(30)
    finally:
        a.close()
        b.close()
    assert bytes(received) == expected


def test_silent_port_fails_within_wait_timeout_with_a_hint(caplog):
    """A port that accepts and says nothing (not ZEO, or TLS): the client tells which address
    it tries at INFO, and gives up after wait_timeout, not after a fixed 10 s (issue 22)."""
    import logging
    import socket
    import time

    import ZEO
    from ZEO.Exceptions import ClientDisconnected

    listener = socket.create_server(("127.0.0.1", 0))
    addr = listener.getsockname()
    caplog.set_level(logging.INFO, logger="ZEO.ClientStorage")
    t0 = time.monotonic()
    try:
        with pytest.raises(ClientDisconnected):
            ZEO.client(addr, wait_timeout=3)
    finally:
        listener.close()
    assert time.monotonic() - t0 < 8
    text = caplog.text
    assert f"connecting to {addr!r}" in text
    assert "sent no ZEO greeting within 3" in text and "TLS" in text
