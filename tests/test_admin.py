"""The admin control socket of a live StorageServer, and the ``zeo --admin`` command."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from ZEO.server import StorageServer
from ZEO.server.admin import AdminError, admin_request
from ZEO.wire import ConnectionClosed, WireClient

pytestmark = pytest.mark.timeout(60)

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def server(make_server, tmp_path):
    return make_server(admin_socket=str(tmp_path / "admin.sock"))


def connect(srv, label=None):
    c = WireClient(srv.addr)
    c.register("1", False)
    if label:
        c.async_call("set_client_label", label)
        c.call("ping")  # the label is set once this returns
    return c


def raw_lines(path: str, payload: bytes, n: int) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        buf = b""
        while buf.count(b"\n") < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_socket_is_private(server):
    mode = os.stat(server.admin.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_status_and_clients(server):
    a, b = connect(server, "worker-a"), connect(server)
    with a, b:
        status = admin_request(server.admin.path, "status")
        assert status["connections"] == 2 and status["pid"] == os.getpid()
        assert status["storages"]["1"]["connections"] == 2
        assert status["storages"]["1"]["last-transaction"] == z64.hex()
        clients = admin_request(server.admin.path, "clients")
        a_port = a.sock.getsockname()[1]
        assert {c["label"] for c in clients} == {
            f"worker-a 127.0.0.1:{a_port}", f"127.0.0.1:{b.sock.getsockname()[1]}"}
        assert all(c["storage"] == "1" and c["protocol"] == "Z5" for c in clients)
        assert len({c["id"] for c in clients}) == 2


def test_disconnect_by_label_id_and_unknown(server):
    a, b = connect(server, "victim"), connect(server)
    with a, b:
        clients = admin_request(server.admin.path, "clients")
        victim = next(c for c in clients if c["label"].startswith("victim "))
        result = admin_request(server.admin.path, "disconnect", victim["label"])
        assert result == {"disconnected": [victim["id"]]}
        with pytest.raises(ConnectionClosed):
            a.call("ping")
        assert b.call("ping") is None  # the other client is untouched
        other = next(c for c in clients if c is not victim)
        assert admin_request(server.admin.path, "disconnect", str(other["id"])) == {
            "disconnected": [other["id"]]}
        with pytest.raises(ConnectionClosed):
            b.call("ping")
        with pytest.raises(AdminError, match="no client 'nobody'"):
            admin_request(server.admin.path, "disconnect", "nobody")


def test_disconnect_by_the_client_label_alone(server):
    """``disconnect myapp`` finds the clients whose client_label is ``myapp`` (issue 22)."""
    a, b, c = connect(server, "myapp"), connect(server, "myapp"), connect(server, "other")
    with a, b, c:
        clients = admin_request(server.admin.path, "clients")
        mine = sorted(x["id"] for x in clients if x["client_label"] == "myapp")
        assert len(mine) == 2
        assert admin_request(server.admin.path, "disconnect", "myapp") == {"disconnected": mine}
        for gone in (a, b):
            with pytest.raises(ConnectionClosed):
                gone.call("ping")
        assert c.call("ping") is None


def test_line_protocol_plain_words_json_and_errors(server):
    replies = raw_lines(
        server.admin.path,
        b'help\n{"command": "clients"}\nfrobnicate\n{not json\ndisconnect\n', 5)
    assert replies[0] == {"ok": True, "result": ["status", "clients", "disconnect",
                                                 "reopen-logs", "stop", "help"]}
    assert replies[1] == {"ok": True, "result": []}
    assert replies[2]["ok"] is False and "unknown command 'frobnicate'" in replies[2]["error"]
    assert replies[3]["ok"] is False and "bad JSON" in replies[3]["error"]
    assert replies[4]["ok"] is False and "usage: disconnect" in replies[4]["error"]


def test_reopen_logs(server, tmp_path):
    import logging

    from ZConfig.components.logger import loghandler

    log = tmp_path / "zeo.log"
    handler = loghandler.FileHandler(str(log))
    logger = logging.getLogger("test-admin-reopen")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("before")
        rotated = tmp_path / "zeo.log.1"
        os.rename(log, rotated)
        assert admin_request(server.admin.path, "reopen-logs") == "log files reopened"
        logger.info("after")
        handler.flush()
        assert "after" in log.read_text()
        assert "after" not in rotated.read_text()
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_stop_closes_server_and_removes_socket(server):
    path = server.admin.path
    assert admin_request(path, "stop") == "stopping"
    assert server._stopped.wait(30)
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        socket.create_connection(server.addr, timeout=5).close()


def zeo(*args: str, status: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ZEO.cli", *args], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=SRC))
    assert r.returncode == status, (r.stdout, r.stderr)
    return r


def test_zeo_command_uses_admin_socket(server, tmp_path):
    with connect(server, "cli-victim"):
        r = zeo("--admin", server.admin.path, "clients")
        header, row = r.stdout.splitlines()
        assert header.split() == ["id", "label", "peer", "storage", "read_only", "protocol",
                                  "calls"]
        assert "cli-victim" in row
        status = json.loads(zeo("--admin", server.admin.path, "status", "--json").stdout)
        assert status["connections"] == 1
        r = zeo("--admin", server.admin.path, "disconnect", "nobody", status=1)
        assert r.stderr == "zeo: no client 'nobody'\n"
    r = zeo("--admin", str(tmp_path / "missing.sock"), "status", status=3)
    assert "cannot talk to" in r.stderr


def test_stale_socket_file_replaced_and_live_one_refused(tmp_path):
    path = str(tmp_path / "admin.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on: left by a crashed server
    srv = StorageServer(("127.0.0.1", 0), {"1": FileStorage(str(tmp_path / "a.fs"))},
                        admin_socket=path)
    other = FileStorage(str(tmp_path / "b.fs"))
    try:
        with pytest.raises(OSError, match="in use"):
            StorageServer(("127.0.0.1", 0), {"1": other}, admin_socket=path)
    finally:
        other.close()
        srv.close()
    assert not os.path.exists(path)


def test_runzeo_config_admin_socket_and_metrics(tmp_path):
    """``admin-socket`` and ``<metrics>`` in a real ``runzeo -C`` config; ``stop`` ends it."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from support.servers import filestorage_conf, free_port, start_server

    admin = str(tmp_path / "admin.sock")
    port = free_port()
    extra = f"  admin-socket {admin}\n  <metrics>\n    address 127.0.0.1:{port}\n  </metrics>"
    srv = start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs"), extra)
    try:
        with WireClient(srv.addr) as c:
            c.register("1", True)
            c.call("ping")
            clients = json.loads(zeo("--admin", admin, "clients", "--json").stdout)
            assert [cl["peer"] for cl in clients] == [f"127.0.0.1:{c.sock.getsockname()[1]}"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            names = {f.name for f in text_string_to_metric_families(r.read().decode())}
        assert {"zeo_loads", "zeo_commit_lock_hold_seconds", "zeo_server_connections"} <= names
        assert zeo("--admin", admin, "stop").stdout == '"stopping"\n'
        assert srv.proc.wait(30) == 0
        assert not os.path.exists(admin)
    finally:
        srv.stop()
