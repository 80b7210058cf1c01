"""Trust boundaries (issue 19), tried from the attacker's side over raw sockets against a real
``runzeo`` with the README's configuration.  After each attack: the server process is alive,
its RSS stays under a stated bound, a normal ``ZEO.DB`` client connects, commits and reads
within a few seconds, and nothing committed is lost (fstest clean at the end).
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from ZODB.scripts import fstest

import ZEO
from support.rawclient import ConnectionClosed, RawClient
from support.servers import filestorage_conf, start_server

Z64 = b"\0" * 8
MAXTID = b"\x7f\xff\xff\xff\xff\xff\xff\xff"
RECORD = b"\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00.}q\x01."
#: Resident memory the server may reach during any attack here (it starts near 40 MB).
RSS_BOUND_MB = 300


def _bu(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _call(msgid: int, name: str, args_ops: bytes, oneway: bool = False) -> bytes:
    """A pickled ``(msgid, oneway, name, (<args_ops>))`` built by hand."""
    return (b"\x80\x03(K" + bytes([msgid]) + (b"\x88" if oneway else b"\x89") + _bu(name)
            + b"(" + args_ops + b"tt.")


def rss_mb(srv) -> float:
    with open(f"/proc/{srv.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    blobs = d / "blobs"
    server = start_server("ours", d, filestorage_conf(d / "Data.fs", blob_dir=blobs))
    server.data_fs = d / "Data.fs"
    server.waits: list[float] = []
    yield server
    with open(f"/proc/{server.proc.pid}/status") as f:
        peak = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
    waits = sorted(server.waits) or [0.0]
    print(f"\ntrust boundaries: server peak RSS {peak} MB; a normal ZEO.DB client connected, "
          f"committed and read {len(waits)} times during the attacks: median "
          f"{waits[len(waits) // 2]:.3f} s, longest {waits[-1]:.3f} s")
    assert peak < RSS_BOUND_MB
    server.stop()
    # Nothing committed was lost or damaged by any attack of this module.
    fstest.check(str(d / "Data.fs"))


_counter = iter(range(10**9))


def normal_client_works(srv, within: float = 5.0) -> float:
    """A fresh ZEO.DB connects, commits and reads back; return the seconds it took."""
    assert srv.proc.poll() is None, "the server died"
    t0 = time.monotonic()
    db = ZEO.DB(srv.addr, wait_timeout=within)
    try:
        with db.transaction() as conn:
            key = f"k{next(_counter)}"
            conn.root()[key] = key
        conn = db.open()
        assert conn.root()[key] == key
        conn.close()
    finally:
        db.close()
    took = time.monotonic() - t0
    if hasattr(srv, "waits"):
        srv.waits.append(took)
    assert took < within
    assert rss_mb(srv) < RSS_BOUND_MB
    return took


def registered(srv, letter=b"Z", read_only=False) -> RawClient:
    c = RawClient(srv.addr, timeout=20)
    c.handshake(letter)
    c.register("1", read_only)
    return c


def refused(c: RawClient, msgid=None) -> bool:
    """The last frame was refused: an error reply (to ``msgid``) or the connection closed."""
    try:
        reply = c.recv_message()
    except (ConnectionClosed, OSError):
        return True
    if msgid is not None:
        assert reply[0] == msgid
    return reply[1] == 2


# --------------------------------------------------------------------------------------------
# Decoding with bounded cost


@pytest.mark.parametrize("where", ["register", "iterator_next"])
def test_deep_nesting_is_refused(srv, where):
    deep = b"N" + b"\x85" * 300_000  # a tuple nested 300,000 deep: hashing it crashed CPython
    t0 = time.monotonic()
    if where == "register":
        with RawClient(srv.addr) as evil:
            evil.handshake(b"Z")
            evil.send_frame(_call(1, "register", deep + b"K\x00"))
            assert refused(evil, 1)
    else:
        with registered(srv, read_only=True) as evil:
            evil.send_frame(_call(9, "iterator_next", deep))
            assert refused(evil, 9)
    assert time.monotonic() - t0 < 5
    normal_client_works(srv)


@pytest.mark.parametrize("levels", [26, 28, 60])
def test_dup_sharing_is_refused(srv, levels):
    # 'N' then DUP+TUPLE2 repeated: 2**levels leaves in ~2*levels bytes.
    dag = b"N" + b"2\x86" * levels
    with RawClient(srv.addr) as evil:
        evil.handshake(b"Z")
        t0 = time.monotonic()
        evil.send_frame(_call(1, "register", dag + b"K\x00"))
        assert refused(evil, 1)
        assert time.monotonic() - t0 < 2
    normal_client_works(srv)


@pytest.mark.parametrize("ctor", [b"czodbpickle\nbinary\n", b"cbuiltins\nlist\n",
                                  b"cbuiltins\ntuple\n", b"cbuiltins\nset\n"])
def test_constructors_do_not_allocate_from_numbers(srv, ctor):
    before = rss_mb(srv)
    with registered(srv) as evil:
        # binary(8 GB) was a 53-byte frame that froze the server for 79 s.
        evil.send_frame(_call(7, "history", ctor + b"\x8a\x05\x00\x00\x00\x00\x02\x85R"))
        assert refused(evil, 7)
        evil.send_frame(_call(8, "history", ctor + _bu("x" * 50_000) + b"\x85R"))
        assert refused(evil, 8)
    assert rss_mb(srv) < before + 50
    normal_client_works(srv)


def test_plain_data_constructors_decode(srv):
    """What real clients send: ZEO 6.2's client writes a dict subclass extension as a
    builtins.dict REDUCE; containers built from data decode and the commit goes through."""
    with registered(srv) as c:
        [oid] = c.call("new_oids", 1)
        ext = b"cbuiltins\ndict\n]" + b"(" + _bu("k") + b"K\x01\x86" + b"e\x85R"
        c.send_frame(_call(0, "tpc_begin", b"K\x63C\x00C\x00" + ext + b"N" + _bu(" "),
                           oneway=True))
        c.oneway("storea", oid, Z64, RECORD, 99)
        assert tuple(c.call("vote", 99)) == ()
        tid = c.call("tpc_finish", 99)
        assert c.call("loadBefore", oid, MAXTID)[1] == tid


def test_msgpack_server_refuses_pickle(tmp_path):
    server = start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs"),
                          "  msgpack true")
    try:
        with RawClient(server.addr) as c:
            assert c.read_greeting() == b"M5"
            c.send_frame(b"Z5")
            c.send_frame(_call(1, "register", _bu("1") + b"\x89"))
            assert c.is_closed_by_peer(timeout=10)
        with RawClient(server.addr) as c:
            c.handshake(b"M")
            assert len(c.register("1", False)) == 8
        assert "msgpack-only" in server.log()
    finally:
        server.stop()


def test_large_values_are_not_logged_in_full(srv):
    with registered(srv) as evil:
        evil.oneway("set_client_label", "L" * 10_000_000)
        for _i in range(20):
            assert evil.call("ping") is None
        evil.send_frame(_call(3, "iterator_next", _bu("x" * 1_000_000)))
        assert refused(evil, 3)
    time.sleep(0.2)
    assert os.path.getsize(srv.log_path) < 2_000_000
    normal_client_works(srv)


# --------------------------------------------------------------------------------------------
# No peer-supplied code through conflict resolution


def _store_conflicting(c: RawClient, oid: bytes, serial: bytes, record: bytes, txn_id: int):
    c.oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
    c.oneway("storea", oid, serial, record, txn_id)
    return _vote(c, txn_id)


def _vote(c: RawClient, txn_id: int):
    c.send_message((500 + txn_id % 100, False, "vote", (txn_id,)))
    while True:
        msg = c.recv_message()
        if msg[2] == ".reply":
            return msg


def _commit(c: RawClient, oid: bytes, serial: bytes, record: bytes, txn_id: int) -> bytes:
    c.oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
    c.oneway("storea", oid, serial, record, txn_id)
    assert tuple(c.call("vote", txn_id)) == ()
    return c.call("tpc_finish", txn_id)


@pytest.mark.parametrize("kind", ["class", "state"])
def test_conflict_resolution_runs_no_code(srv, tmp_path, kind):
    marker = tmp_path / "ran"
    call = b"cos\nsystem\n" + _bu(f"touch {marker}") + b"\x85R"
    if kind == "class":  # the record's class pickle is a call
        evil_record = b"\x80\x03" + call + b"N\x86." + b"\x80\x03}."
    else:  # a resolvable class, with a call hidden in its state
        evil_record = (b"\x80\x03cBTrees.Length\nLength\nN\x86." + b"\x80\x03" + call + b".")
    with registered(srv) as c:
        [oid] = c.call("new_oids", 1)
        first = _commit(c, oid, Z64, b"\x80\x03cBTrees.Length\nLength\nN\x86.\x80\x03K\x01.",
                        next(_counter) + 1000)
        _commit(c, oid, first, b"\x80\x03cBTrees.Length\nLength\nN\x86.\x80\x03K\x02.",
                next(_counter) + 1000)
        txn_id = next(_counter) + 1000
        reply = _store_conflicting(c, oid, first, evil_record, txn_id)  # stale serial
        assert reply[1] == 2 and reply[3][0] == "ZODB.POSException.ConflictError", reply
    assert not marker.exists(), "conflict resolution ran code from a record"
    normal_client_works(srv)


def test_allowed_class_still_resolves(srv):
    with registered(srv) as c:
        [oid] = c.call("new_oids", 1)
        rec = lambda n: b"\x80\x03cBTrees.Length\nLength\nN\x86.\x80\x03K" + bytes([n]) + b"."  # noqa: E731
        first = _commit(c, oid, Z64, rec(1), 4001)
        _commit(c, oid, first, rec(2), 4002)
        c.oneway("tpc_begin", 4003, b"", b"", {}, None, " ")
        c.oneway("storea", oid, first, rec(5), 4003)  # stale: Length resolves 2 + (5 - 1)
        assert list(c.call("vote", 4003)) == [oid]
        c.call("tpc_finish", 4003)
        data = c.call("loadBefore", oid, MAXTID)[0]
        assert data.endswith(b"K\x06.")


# --------------------------------------------------------------------------------------------
# Writer input validated


def _begin_refused(c: RawClient, *begin_args) -> None:
    c.oneway("tpc_begin", *begin_args)
    assert c.is_closed_by_peer(timeout=10)  # a one-way call that fails closes


@pytest.mark.parametrize("tid", [b"\xff" * 8, MAXTID, Z64, b"\x01" * 8, b"short", 5])
def test_bad_begin_tid_refused(srv, tid):
    with registered(srv) as c:
        _begin_refused(c, 77, b"", b"", {}, tid, " ")
    normal_client_works(srv)


@pytest.mark.parametrize("oid", [b"\xff" * 8, b"\x80" + b"\0" * 7, b"\0" * 9, b"\0" * 7, 5])
def test_bad_oid_refused(srv, oid):
    with registered(srv) as c:
        c.oneway("tpc_begin", 78, b"", b"", {}, None, " ")
        c.oneway("storea", oid, Z64, RECORD, 78)
        assert c.is_closed_by_peer(timeout=10)
    with registered(srv) as c:
        [a, b] = c.call("new_oids", 2)
        assert int.from_bytes(b, "big") == int.from_bytes(a, "big") + 1 < 2**32
    normal_client_works(srv)


@pytest.mark.parametrize("ending", ["tpc_abort", "failed vote"])
def test_aborted_store_leaves_no_trace_in_the_oid_counter(srv, ending):
    with registered(srv) as c:
        [existing, top] = c.call("new_oids", 2)
        _commit(c, existing, Z64, RECORD, next(_counter) + 5000)
        high = (int.from_bytes(top, "big") + 10**12).to_bytes(8, "big")
        txn_id = next(_counter) + 5000
        c.oneway("tpc_begin", txn_id, b"", b"", {}, None, " ")
        c.oneway("storea", high, Z64, RECORD, txn_id)
        if ending == "failed vote":  # a stale serial: ConflictError, the vote aborted
            c.oneway("storea", existing, Z64, RECORD, txn_id)
            reply = _vote(c, txn_id)
            assert reply[1] == 2
        else:
            assert tuple(c.call("vote", txn_id)) == ()
            c.call("tpc_abort", txn_id)
        [nxt] = c.call("new_oids", 1)
        assert int.from_bytes(nxt, "big") == int.from_bytes(top, "big") + 1


def test_past_tid_refused_under_the_lock(srv):
    """A tid after the last commit when begun, overtaken by another commit before the vote."""
    with registered(srv) as a, registered(srv) as b:
        last = a.call("lastTransaction")
        tid = (int.from_bytes(last, "big") + 1).to_bytes(8, "big")
        a.oneway("tpc_begin", 80, b"", b"", {}, tid, " ")
        [oid] = b.call("new_oids", 1)
        _commit(b, oid, Z64, RECORD, 81)  # now the last tid is after ``tid``
        [oid2] = a.call("new_oids", 1)
        a.oneway("storea", oid2, Z64, RECORD, 80)
        reply = _vote(a, 80)
        assert reply[1] == 2 and "not after" in str(reply[3])
    normal_client_works(srv)


# --------------------------------------------------------------------------------------------
# Resources bounded


def test_iterators_are_limited(srv):
    with registered(srv, read_only=True) as c:
        ids = [c.call("iterator_start", None, None) for _ in range(16)]
        c.send_message((901, False, "iterator_start", (None, None)))
        reply = c.recv_message()
        assert reply[1] == 2 and "max-iterators" in str(reply[3])
        c.oneway("iterator_gc", ids[:8])
        assert isinstance(c.call("iterator_start", None, None), int)
    pid = srv.proc.pid
    assert len(os.listdir(f"/proc/{pid}/fd")) < 100
    normal_client_works(srv)


def test_pipelined_calls_do_not_pile_up(srv):
    """100,000 pipelined history calls whose replies are never read."""
    before = rss_mb(srv)
    evil = registered(srv, read_only=True)
    evil.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frame = evil.codec.encode((1, False, "history", (Z64, 1)))
    blob = (struct.pack(">I", len(frame)) + frame) * 1000
    evil.sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while sent < 100 and time.monotonic() < deadline:
        try:
            evil.sock.send(blob)  # partial sends only make the test send less
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
    t0 = time.monotonic()
    normal_client_works(srv)
    assert time.monotonic() - t0 < 5
    assert rss_mb(srv) < before + 100
    evil.close()


def test_clients_that_do_not_read_large_replies(srv):
    """6 clients ask for a 1 MB record 2,000 times each and never read: each is stopped
    being read once its backlog passes 1 MiB, instead of holding gigabytes."""
    with registered(srv) as w:
        [oid] = w.call("new_oids", 1)
        _commit(w, oid, Z64, b"\x80\x03}." + b"x" * 2**20, 6001)
    before = rss_mb(srv)
    evil = []
    for _ in range(6):
        c = registered(srv, read_only=True)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        frame = c.codec.encode((1, False, "loadBefore", (oid, MAXTID)))
        c.sock.setblocking(False)
        try:
            c.sock.send((struct.pack(">I", len(frame)) + frame) * 2000)
        except BlockingIOError:
            pass
        evil.append(c)
    time.sleep(1)
    assert rss_mb(srv) < before + 60
    normal_client_works(srv)
    for c in evil:
        c.close()


def test_blob_chunks_need_a_writable_transaction(srv):
    for read_only in (True, False):  # read-only, or writable but outside a transaction
        with registered(srv, read_only=read_only) as c:
            c.oneway("storeBlobStart")
            assert c.is_closed_by_peer(timeout=10)
    normal_client_works(srv)


def test_every_record_counts_toward_the_transaction_size(tmp_path):
    server = start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs"),
                          "  max-transaction-size 1MB")
    try:
        with registered(server) as c:
            [oid] = c.call("new_oids", 1)
            c.oneway("tpc_begin", 91, b"", b"", {}, None, " ")
            frames = b"".join(
                struct.pack(">I", len(f)) + f for f in
                [c.codec.encode((0, True, "checkCurrentSerialInTransaction", (oid, Z64, 91)))]
            ) * 10_000
            c.send_raw(frames)  # 10,000 checks: 1.6 MB of overhead, over the 1 MB limit
            assert c.is_closed_by_peer(timeout=10)
        assert "max-transaction-size" in server.log()
        normal_client_works(server)
    finally:
        server.stop()


def test_partial_frames_before_registration_are_small(srv):
    before = rss_mb(srv)
    conns = []
    for _ in range(8):
        c = RawClient(srv.addr)
        c.read_greeting()
        c.send_raw(b"\x00\x00\x00\x02Z5" + struct.pack(">I", 200 * 2**20) + b"x" * 1000)
        conns.append(c)
    for c in conns:
        assert c.is_closed_by_peer(timeout=10)  # over the pre-registration frame limit
        c.close()
    assert rss_mb(srv) < before + 20
    normal_client_works(srv)


def test_idle_connections_do_not_lock_clients_out(tmp_path):
    """With nofile 256, 400 idle unregistered connections: a real client still gets in."""
    import sys

    from support.servers import ServerProcess, write_config

    conf, addr = write_config(tmp_path, filestorage_conf(tmp_path / "Data.fs"))
    code = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256));"
            " sys.argv[0] = 'runzeo'; runpy.run_module('ZEO.runzeo', run_name='__main__')")
    server = ServerProcess([sys.executable, "-c", code, "-C", str(conf)], addr,
                           tmp_path / "server.log")
    idle = []
    try:
        for _ in range(400):
            s = socket.create_connection(addr, timeout=5)
            idle.append(s)
        time.sleep(1.2)  # older than a second: they may be evicted for a registering client
        normal_client_works(server, within=10)
        assert server.proc.poll() is None
        assert "max-connections" in server.log()
        # 256 descriptors: 64 kept, a quarter for iterators, the rest for connections.
        with registered(server) as c:
            assert c.call("ping") is None
        assert "at max-connections (128)" in server.log()
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_silent_voter_loses_the_lock(tmp_path):
    server = start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs"),
                          "  transaction-timeout 1")
    try:
        with registered(server) as silent:
            [oid] = silent.call("new_oids", 1)
            silent.oneway("tpc_begin", 92, b"", b"", {}, None, " ")
            silent.oneway("storea", oid, Z64, RECORD, 92)
            assert tuple(silent.call("vote", 92)) == ()
            # ... and never finishes: the lock is taken back after the timeout.
            took = normal_client_works(server, within=10)
            assert 0.5 < took < 10
            assert silent.is_closed_by_peer(timeout=5)
    finally:
        server.stop()


def test_transaction_timeout_on_by_default(srv):
    with registered(srv) as c:
        assert c.call("server_status")["timeout-thread-is-alive"] is True


def _partial_frame(c: RawClient, size: int, sent: int) -> None:
    """Announce a ``size``-byte frame and send ``sent`` bytes of it."""
    c.send_raw(struct.pack(">I", size))
    chunk = b"x" * (1 << 20)
    for _ in range(sent >> 20):
        c.send_raw(chunk)


def test_memory_of_partial_frames_is_returned(srv):
    before = rss_mb(srv)
    conns = [registered(srv) for _ in range(4)]
    for c in conns:
        _partial_frame(c, 60 * 2**20, 50 * 2**20)
    deadline = time.monotonic() + 10
    while rss_mb(srv) < before + 150 and time.monotonic() < deadline:
        time.sleep(0.05)
    held = rss_mb(srv)
    assert held > before + 150  # the server holds the partial frames...
    for c in conns:
        c.close()
    deadline = time.monotonic() + 10
    while rss_mb(srv) > before + 30 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rss_mb(srv) < before + 30, (before, held, rss_mb(srv))  # ...and gives them back
    normal_client_works(srv)


def test_server_wide_budget_for_partial_frames(tmp_path):
    server = start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs"),
                          "  max-buffered 64MB")
    try:
        conns = [registered(server) for _ in range(4)]
        closed = 0
        for c in conns:
            try:
                _partial_frame(c, 40 * 2**20, 30 * 2**20)
            except OSError:
                closed += 1
        closed += sum(c.is_closed_by_peer(timeout=2) for c in conns)
        assert closed >= 2  # 4 x 30 MB does not fit in 64 MB: the later ones are dropped
        assert "server-wide buffer budget" in server.log()
        normal_client_works(server)
        for c in conns:
            c.close()
    finally:
        server.stop()
