"""Bounded resources: no single client can exhaust the server, and the others keep working."""

from __future__ import annotations

import os
import stat

import pytest
from ZODB.utils import p64, z64

from support.wire import ConnectionClosed, WireClient

pytestmark = pytest.mark.timeout(60)
MAXTID = p64(2**63 - 1)




def connect(server):
    c = WireClient(server.addr)
    c.call("register", "1", False)
    return c


def commit(c, records, txn_id=1):
    c.async_call("tpc_begin", txn_id, b"", b"", {}, None, " ")
    for oid, data in records:
        c.async_call("storea", oid, z64, data, txn_id)
    assert list(c.call("vote", txn_id)) == []
    return c.call("tpc_finish", txn_id)


def test_large_transaction_spills_to_disk_and_commits_intact(make_server, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    server = make_server(transaction_memory=10_000, spool_dir=str(spool))
    c = connect(server)
    oids = c.call("new_oids", 20)
    records = [(oid, bytes([i]) * 5000) for i, oid in enumerate(oids)]
    tid = commit(c, records)
    for oid, data in records:
        assert c.call("loadBefore", oid, MAXTID) == (data, tid, None)


def test_transaction_size_cap_closes_only_that_client(make_server):
    server = make_server(max_transaction_size=50_000)
    greedy, other = connect(server), connect(server)
    oid = greedy.call("new_oids", 1)[0]
    greedy.async_call("tpc_begin", 1, b"", b"", {}, None, " ")
    try:
        for _ in range(20):
            greedy.async_call("storea", oid, z64, b"x" * 10_000, 1)
    except OSError:
        pass  # the server may close while we are still sending: that is the point
    assert greedy.is_closed()
    assert server.server_status("1")["active_txns"] == 0
    oid2 = other.call("new_oids", 1)[0]
    tid = commit(other, [(oid2, b"fine")], txn_id=2)
    assert other.call("loadBefore", oid2, MAXTID) == (b"fine", tid, None)


def test_connection_cap(make_server):
    server = make_server(max_connections=2)
    a, b = connect(server), connect(server)
    with pytest.raises((ConnectionClosed, ConnectionError)):
        WireClient(server.addr)  # refused before the greeting
    a.close()
    assert b.call("ping") is None


def test_unregistered_connection_is_closed_after_the_deadline(make_server):
    server = make_server(register_timeout=0.3)
    idle = WireClient(server.addr)
    assert idle.is_closed(timeout=10)
    registered = connect(server)
    assert not registered.is_closed(timeout=0.6)  # registered clients may stay idle


def test_client_that_never_reads_is_dropped(make_server):
    server = make_server(max_output_buffer=1 << 20)
    writer = connect(server)
    oid = writer.call("new_oids", 1)[0]
    commit(writer, [(oid, b"b" * (1 << 20))])
    reader = connect(server)
    for _ in range(100):  # ask for 100 MiB and read none of it
        try:
            reader.send_call("loadBefore", oid, MAXTID)
        except OSError:
            break
    # Had the server kept the connection, this would read 100 replies, then time out.
    reader.sock.settimeout(20)
    with pytest.raises((ConnectionClosed, ConnectionError)):
        while True:
            reader.read_message()
    assert writer.call("ping") is None
    assert len(server.sessions) == 1


def test_unix_socket_is_private(make_server, tmp_path):
    path = str(tmp_path / "zeo.sock")
    server = make_server(addr=path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert connect(server).call("ping") is None


def test_tcp_keepalive_on_client_connections(make_server):
    import socket

    server = make_server(tcp_keepalive=12)
    client = connect(server)  # kept: a collected client closes its socket
    (session,) = list(server.sessions)
    sock = session.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 6
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12_000
    client.close()


def test_resource_keys_in_the_config(tmp_path):
    from support.servers import filestorage_conf, start_server

    path = str(tmp_path / "zeo.sock")
    extra = ("  max-connections 1\n  unix-socket-mode 0660\n  max-message-size 1MB\n"
             "  register-timeout 30\n  tcp-keepalive 0\n")
    server = start_server("ours", tmp_path / "srv", filestorage_conf(tmp_path / "Data.fs"),
                          zeo_extra=extra, addr=path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        first = connect_addr(path)
        with pytest.raises((ConnectionClosed, ConnectionError)):
            WireClient(path)  # over max-connections
        try:  # over max-message-size: refused on the frame header
            first.async_call("ping", b"x" * (2 << 20))
        except OSError:
            pass  # closed while we were still sending
        assert first.is_closed()
    finally:
        server.stop()
    assert "max-message-size" not in server.log()  # accepted, not reported as unknown


def connect_addr(addr):
    c = WireClient(addr)
    c.call("register", "1", False)
    return c
