"""StorageServer behaviour on the wire: commit lock, invalidations, timeouts, read-only.

Each test runs a real StorageServer (its own loop thread, real sockets, a real FileStorage)
and drives it with raw protocol calls, so the server's exact replies and ordering are visible.
"""

from __future__ import annotations

import json
import pickle
import socket
import struct
import threading
import time

import pytest
from persistent.mapping import PersistentMapping
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import p64, z64

from support.wire import RemoteError, WireClient
from ZEO.server import StorageServer
from ZEO.wire import ConnectionClosed

pytestmark = pytest.mark.timeout(60)




def connect(server, storage="1", read_only=False, protocol=None):
    c = WireClient(server.addr, protocol=protocol)
    c.call("register", storage, read_only)
    return c


def commit(c, oid, serial, data, txn_id=1):
    c.async_call("tpc_begin", txn_id, b"user", b"desc", {}, None, " ")
    c.async_call("storea", oid, serial, data, txn_id)
    assert list(c.call("vote", txn_id)) == []
    return c.call("tpc_finish", txn_id)


def test_register_unknown_storage_then_known(make_server):
    server = make_server()
    c = WireClient(server.addr)
    with pytest.raises(RemoteError) as e:
        c.call("register", "nope", 0)
    assert e.value.args == ("builtins.ValueError", ("unknown storage: nope",))
    assert c.call("register", "1", 0) == z64
    assert c.call("ping") is None


def test_commit_invalidates_others_and_informs_committer(make_server):
    server = make_server()
    a, b = connect(server), connect(server)
    oid = a.call("new_oids", 1)[0]
    tid = commit(a, oid, z64, b"data1")
    # The committer got `info` before its reply, and no invalidation of its own.
    assert [m[2] for m in a.oneways] == ["info"]
    assert set(a.oneways[0][3][0]) == {"length", "size"}
    assert b.read_message() == (0, True, "invalidateTransaction", (tid, [oid]))
    assert b.call("loadBefore", oid, p64(2**63 - 1)) == (b"data1", tid, None)
    assert b.call("lastTransaction") == tid
    # A client registering now learns that tid at once.
    assert connect(server).call("lastTransaction") == tid


def test_commit_lock_is_fifo_and_held_until_finish(make_server):
    server = make_server()
    clients = [connect(server) for _ in range(3)]
    oids = clients[0].call("new_oids", 3)
    for i, c in enumerate(clients):
        c.async_call("tpc_begin", 10 + i, b"", b"", {}, None, " ")
        c.async_call("storea", oids[i], z64, b"x", 10 + i)
    assert clients[0].call("vote", 10) == []
    pending = []
    for i in (1, 2):
        # One at a time: two votes sent at once on two connections may be read in either
        # order, and this test is about the order the server saw.
        pending.append(clients[i].send_call("vote", 10 + i))
        deadline = time.monotonic() + 5
        while server.server_status("1")["waiting"] != i and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.server_status("1")["waiting"] == i
    assert server.server_status("1")["lock_time"] is not None
    clients[0].call("tpc_finish", 10)
    # Client 1 is granted the lock; client 2 still waits for it.
    assert clients[1].wait_reply(pending[0]) == (0, [])
    assert server.server_status("1")["waiting"] == 1
    clients[1].call("tpc_abort", 11)
    assert clients[2].wait_reply(pending[1]) == (0, [])
    clients[2].call("tpc_finish", 12)
    status = server.server_status("1")
    assert (status["commits"], status["aborts"], status["waiting"]) == (2, 1, 0)
    assert status["lock_time"] is None


def test_a_load_during_tpc_finish_waits_behind_it_not_on_the_loop(make_server, tmp_path):
    """FileStorage blocks readers for all of tpc_finish (fsync included).  A load arriving
    then is queued behind the finish on the commit worker: other clients are still served,
    and the load's reply, from the new state, follows the commit's invalidation."""
    from ZODB.FileStorage import FileStorage

    slow, entered, proceed = threading.Event(), threading.Event(), threading.Event()

    class SlowFinish(FileStorage):
        def _finish_finish(self, tid):  # ZODB's hook for tests: inside the file pool's write lock
            if slow.is_set():
                entered.set()
                proceed.wait(20)
            super()._finish_finish(tid)

    server = make_server(storages={"1": SlowFinish(str(tmp_path / "Data.fs"))})
    a, b, c = connect(server), connect(server), connect(server)
    arrivals = []  # b's incoming messages, in order
    receive = b.core.receive_data

    def recording(data):
        for msg in receive(data):
            arrivals.append(msg[2])
            yield msg

    b.core.receive_data = recording
    oid = a.call("new_oids", 1)[0]
    tid1 = commit(a, oid, z64, b"v1", txn_id=1)
    assert b.read_message()[3] == (tid1, [oid])
    arrivals.clear()
    slow.set()
    a.async_call("tpc_begin", 2, b"", b"", {}, None, " ")
    a.async_call("storea", oid, tid1, b"v2", 2)
    assert a.call("vote", 2) == []
    finish = a.send_call("tpc_finish", 2)
    assert entered.wait(10)
    load = b.send_call("loadBefore", oid, p64(2**63 - 1))
    missing = b.send_call("loadBefore", p64(2**40), p64(2**63 - 1))
    try:
        # Before the fix the loop sat in FileStorage's reader wait and this timed out.
        assert c.call("lastTransaction") == tid1
    finally:
        proceed.set()
    tid2 = a.wait_reply(finish)[1]
    assert b.wait_reply(load) == (0, (b"v2", tid2, None))
    flags, error = b.wait_reply(missing)
    assert flags and error[0] == "ZODB.POSException.POSKeyError"
    assert arrivals == ["invalidateTransaction", ".reply", ".reply"]
    assert server.states["1"].statistics()["loads_behind_finish"] == 2


def test_a_client_gone_during_its_vote_leaves_no_storage_transaction(make_server, tmp_path):
    """The vote runs on the commit worker; the client disconnects meanwhile.  The storage's
    transaction must be aborted when the vote returns, or the next tpc_begin blocks."""
    from ZODB.FileStorage import FileStorage

    entered, proceed = threading.Event(), threading.Event()

    class SlowVote(FileStorage):
        def tpc_vote(self, transaction):
            if not proceed.is_set():
                entered.set()
                proceed.wait(20)
            return super().tpc_vote(transaction)

    server = make_server(storages={"1": SlowVote(str(tmp_path / "Data.fs"))},
                         inline_vote_bytes=0)  # every vote goes to the commit worker
    a, b = connect(server), connect(server)
    oid = a.call("new_oids", 1)[0]
    a.async_call("tpc_begin", 1, b"", b"", {}, None, " ")
    a.async_call("storea", oid, z64, b"a", 1)
    a.send_call("vote", 1)
    assert entered.wait(10)
    a.close()
    deadline = time.monotonic() + 10
    while server.server_status("1")["connections"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.server_status("1")["connections"] == 1  # gone while its vote still runs
    proceed.set()
    tid = commit(b, oid, z64, b"b", txn_id=2)
    assert b.call("loadBefore", oid, p64(2**63 - 1)) == (b"b", tid, None)
    status = server.server_status("1")
    assert (status["commits"], status["aborts"], status["waiting"]) == (1, 1, 0)


def test_disconnect_while_holding_the_lock_releases_it(make_server):
    server = make_server()
    a, b = connect(server), connect(server)
    oid = a.call("new_oids", 1)[0]
    a.async_call("tpc_begin", 1, b"", b"", {}, None, " ")
    a.async_call("storea", oid, z64, b"a", 1)
    assert a.call("vote", 1) == []
    b.async_call("tpc_begin", 2, b"", b"", {}, None, " ")
    b.async_call("storea", oid, z64, b"b", 2)
    msgid = b.send_call("vote", 2)
    a.close()  # gone between vote and finish
    assert b.wait_reply(msgid) == (0, [])
    tid = b.call("tpc_finish", 2)
    assert b.call("loadBefore", oid, p64(2**63 - 1)) == (b"b", tid, None)


def test_transaction_timeout_closes_the_holder(make_server):
    server = make_server(transaction_timeout=0.5)
    a, b = connect(server), connect(server)
    oid = a.call("new_oids", 1)[0]
    a.async_call("tpc_begin", 1, b"", b"", {}, None, " ")
    a.async_call("storea", oid, z64, b"a", 1)
    assert a.call("vote", 1) == []
    assert server.server_status("1")["timeout-thread-is-alive"] is True
    assert a.is_closed(timeout=10)  # the server closed the connection of the holder
    tid = commit(b, oid, z64, b"b", txn_id=2)
    assert b.call("loadBefore", oid, p64(2**63 - 1)) == (b"b", tid, None)


def test_conflict_error_reply_and_lock_released(make_server):
    server = make_server()
    a = connect(server)
    oid = a.call("new_oids", 1)[0]
    tid1 = commit(a, oid, z64, b"v1")
    a.async_call("tpc_begin", 2, b"", b"", {}, None, " ")
    a.async_call("storea", oid, z64, b"stale", 2)  # written against an old serial
    with pytest.raises(RemoteError) as e:
        a.call("vote", 2)
    name, payload = e.value.args
    assert name == "ZODB.POSException.ConflictError"
    assert payload["oid"] == oid and payload["serials"] == (tid1, z64)
    assert a.call("tpc_abort", 2) is None  # a silent no-op after a failed vote
    commit(a, oid, tid1, b"v2", txn_id=3)  # the lock was released
    assert server.server_status("1")["conflicts"] == 1


def test_client_conflict_resolution_returns_conflicts(make_server):
    server = make_server(client_conflict_resolution=True)
    a = connect(server)
    oid = a.call("new_oids", 1)[0]
    tid1 = commit(a, oid, z64, b"v1")
    a.async_call("tpc_begin", 2, b"", b"", {}, None, " ")
    a.async_call("storea", oid, z64, b"mine", 2)
    conflicts = a.call("vote", 2)
    assert conflicts == [{"oid": oid, "serials": (tid1, z64), "data": b"mine"}]
    # The client resolves, stores again against the committed serial and votes again.
    a.async_call("storea", oid, tid1, b"resolved", 2)
    assert a.call("vote", 2) == []
    tid2 = a.call("tpc_finish", 2)
    assert a.call("loadBefore", oid, p64(2**63 - 1)) == (b"resolved", tid2, None)


def test_get_invalidations_from_the_queue(make_server):
    server = make_server(invalidation_queue_size=3)
    a = connect(server)
    oids = a.call("new_oids", 5)
    tids = [commit(a, oid, z64, b"d", txn_id=i) for i, oid in enumerate(oids)]
    latest, changed = a.call("getInvalidations", tids[2])
    assert latest == tids[4] and set(changed) == set(oids[3:])
    assert a.call("getInvalidations", tids[4]) == (tids[4], [])
    assert a.call("getInvalidations", tids[0]) is None  # older than the queue covers


def test_read_only_server(make_server):
    server = make_server(read_only=True)
    c = WireClient(server.addr)
    with pytest.raises(RemoteError) as e:
        c.call("register", "1", False)
    assert e.value.class_name == "ZODB.POSException.ReadOnlyError"
    c.call("register", "1", True)
    with pytest.raises(RemoteError) as e:
        c.call("new_oids")
    assert e.value.class_name == "ZODB.POSException.ReadOnlyError"
    c.async_call("tpc_begin", 1, b"", b"", {}, None, " ")  # a failing one-way call
    assert c.is_closed()


def test_pickle_server_serves_msgpack_and_pickle_clients(make_server):
    server = make_server()
    z = connect(server)
    assert z.greeting == b"Z5"
    m = connect(server, protocol=b"M5")  # the client's letter decides (zeo-facts §1.2)
    oid = m.call("new_oids", 1)[0]
    tid = commit(m, oid, z64, b"both")
    assert z.read_message() == (0, True, "invalidateTransaction", (tid, [oid]))
    assert z.call("loadBefore", oid, p64(2**63 - 1)) == (b"both", tid, None)


def test_msgpack_server_refuses_pickle_clients(make_server):
    """Unlike ZEO, a server told to speak msgpack decodes no pickle at all (security.rst)."""
    server = make_server(msgpack=True)
    m = connect(server)
    assert m.greeting == b"M5"
    with pytest.raises((OSError, ConnectionClosed)):
        connect(server, protocol=b"Z5")
    assert m.call("lastTransaction") == z64


def test_ruok_status(make_server):
    server = make_server(storages={"1": MappingStorage(), "two": MappingStorage()})
    with socket.create_connection(server.addr, timeout=10) as s:
        s.sendall(struct.pack(">I", 4) + b"ruok")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    (n,) = struct.unpack(">I", data[:4])
    assert data[4 : 4 + n] == b"Z5"
    status = json.loads(data[8 + n :])
    assert set(status) == {"1", "two"}
    assert status["1"]["last-transaction"] == "0" * 16


def test_pack_informs_every_client(make_server):
    server = make_server()
    a, b = connect(server), connect(server)
    root = pickle.dumps((PersistentMapping, None), 3) + pickle.dumps({"data": {}}, 3)
    commit(a, z64, z64, root)  # FileStorage packs from the root object
    b.read_message()  # the invalidation
    assert a.call("pack", time.time(), True) is None
    assert any(m[2] == "info" for m in a.oneways)
    assert b.read_message()[2] == "info"


def test_iteration_over_the_wire(make_server):
    server = make_server()
    a = connect(server)
    oid = a.call("new_oids", 1)[0]
    tid = commit(a, oid, z64, b"rec")
    iid = a.call("iterator_start", None, None)
    assert a.call("iterator_next", iid) == (tid, " ", b"user", b"desc", {})
    riid = a.call("iterator_record_start", iid, tid)
    assert a.call("iterator_record_next", riid) == (oid, tid, b"rec", None)
    assert a.call("iterator_record_next", riid) is None
    assert a.call("iterator_next", iid) is None
    with pytest.raises(RemoteError) as e:
        a.call("iterator_next", iid)
    assert e.value.class_name == "builtins.KeyError"


def test_mapping_storage_has_no_undo(make_server):
    # MappingStorage lacks supportsUndo(): get_info must still answer (ZEO.server's default).
    server = make_server(storages={"1": MappingStorage()})
    c = connect(server)
    assert c.call("get_info")["supportsUndo"] is False
    assert tuple(c.call("undoLog", 0, 20)) == ()


def test_invalidations_never_go_backwards(make_server):
    # A storage re-reporting an older tid (external invalidation) must not move clients back.
    server = make_server()
    a, b = connect(server), connect(server)
    oid = a.call("new_oids", 1)[0]
    tid = commit(a, oid, z64, b"d")
    assert b.read_message()[3] == (tid, [oid])
    state = server.states["1"]
    older = p64(int.from_bytes(tid, "big") - 1)
    server.event_loop.call_soon_threadsafe(state.publish, older, [oid], None)
    newer = p64(int.from_bytes(tid, "big") + 1)
    server.event_loop.call_soon_threadsafe(state.publish, newer, [oid], None)
    assert b.read_message()[3] == (newer, [oid])  # the older one was not sent
    assert b.call("lastTransaction") == newer


def test_every_interface_port_zero_is_one_port_for_both_families():
    """``runzeo -a 0`` on a dual-stack host: IPv4 and IPv6 on the same port (issue 22)."""
    server = StorageServer(("", 0), {"1": MappingStorage()})
    try:
        ports = {s.getsockname()[1] for lst in server._listeners for s in lst.sockets}
        assert len(ports) == 1 and server.addresses[0][1] in ports
    finally:
        server.close()


def test_timeout_thread_field_as_zeo_reports_it():
    """ZEO's ``timeout-thread-is-alive``: True with a timeout (30 s by default), "stub"
    without one (operations.rst)."""
    with_timeout = StorageServer(("127.0.0.1", 0), {"1": MappingStorage()})
    without = StorageServer(("127.0.0.1", 0), {"1": MappingStorage()}, transaction_timeout=None)
    try:
        assert with_timeout.transaction_timeout == 30.0
        assert with_timeout.server_status("1")["timeout-thread-is-alive"] is True
        assert without.server_status("1")["timeout-thread-is-alive"] == "stub"
    finally:
        with_timeout.close()
        without.close()
