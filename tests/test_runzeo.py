"""runzeo as users run it: a subprocess started from a config file, driven by signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.servers import ServerProcess, free_port, wait_for_address
from support.waiting import wait_for_log
from support.wire import RemoteError, WireClient
from ZEO.wire import ruok

REPO = Path(__file__).resolve().parents[1]
RUNZEO = [sys.executable, "-m", "ZEO.runzeo"]


def start(tmp_path: Path, conf_text: str, addr, *extra: str, name: str = "zeo",
          env: dict | None = None) -> ServerProcess:
    conf = tmp_path / f"{name}.conf"
    conf.write_text(conf_text)
    return ServerProcess([*RUNZEO, "-C", str(conf), *extra], addr, tmp_path / f"{name}.log",
                         env=env)


@pytest.fixture
def servers():
    """Collects started servers and stops the ones still running at the end."""
    started: list[ServerProcess] = []
    yield started
    for s in started:
        s.stop()


def fs_conf(tmp_path: Path, name: str = "1", file: str = "Data.fs") -> str:
    return f"<filestorage {name}>\n  path {tmp_path / file}\n</filestorage>\n"




def wait_exit(server: ServerProcess, timeout: float = 30) -> int:
    rc = server.proc.wait(timeout)
    server.stop()
    return rc


def run_runzeo(*args: str, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*RUNZEO, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


# --- serving ----------------------------------------------------------------------------------


def test_tcp_and_unix_socket_at_once(tmp_path, servers):
    port = free_port()
    sock = str(tmp_path / "zeo.sock")
    conf = f"<zeo>\n  address 127.0.0.1:{port}\n  address {sock}\n</zeo>\n" + fs_conf(tmp_path)
    s = start(tmp_path, conf, ("127.0.0.1", port))
    servers.append(s)
    for addr in (("127.0.0.1", port), sock):
        with WireClient(addr) as c:
            assert c.greeting == b"Z5"
            assert c.call("register", "1", False) == b"\0" * 8
    assert list(ruok(sock)[1]) == ["1"]
    log = s.log()
    start_lines = [line for line in log.splitlines() if "serving" in line]
    assert len(start_lines) == 1
    assert f"127.0.0.1:{port}" in start_lines[0] and sock in start_lines[0]
    assert "FileStorage" in start_lines[0] and "read-write" in start_lines[0]
    assert wait_exit_after(s, signal.SIGTERM) == 0
    assert not os.path.exists(sock)


def wait_exit_after(server: ServerProcess, sig: int) -> int:
    server.send_signal(sig)
    return wait_exit(server)


def test_several_storages(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    conf = (f"<zeo>\n  address {sock}\n</zeo>\n" + fs_conf(tmp_path, "main")
            + "<mappingstorage scratch/>\n"
            + f"<blobstorage blobs>\n  blob-dir {tmp_path / 'blobs'}\n"
              f"  <filestorage>\n    path {tmp_path / 'b.fs'}\n  </filestorage>\n"
              "</blobstorage>\n")
    servers.append(start(tmp_path, conf, sock))
    assert sorted(ruok(sock)[1]) == ["blobs", "main", "scratch"]
    for sid in ("main", "scratch", "blobs"):
        with WireClient(sock) as c:
            assert c.call("register", sid, False) == b"\0" * 8
            assert c.call("lastTransaction") == b"\0" * 8
    with WireClient(sock) as c:
        with pytest.raises(RemoteError):
            c.call("register", "1", False)


def test_read_only_server(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    conf = f"<zeo>\n  address {sock}\n  read-only true\n</zeo>\n" + fs_conf(tmp_path)
    (tmp_path / "zeo.pid").write_text("")
    s = start(tmp_path, conf, sock)
    servers.append(s)
    with WireClient(sock) as c:
        with pytest.raises(RemoteError) as info:
            c.call("register", "1", False)
        assert "ReadOnlyError" in info.value.class_name
    with WireClient(sock) as c:
        c.call("register", "1", True)
    assert "read-only" in [ln for ln in s.log().splitlines() if "serving" in ln][0]


def test_msgpack_server(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    conf = f"<zeo>\n  address {sock}\n  msgpack true\n</zeo>\n<mappingstorage/>\n"
    servers.append(start(tmp_path, conf, sock))
    with WireClient(sock) as c:
        assert c.greeting == b"M5"
        assert c.call("register", "1", False) == b"\0" * 8


def test_msgpack_from_environment(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    conf = f"<zeo>\n  address {sock}\n</zeo>\n<mappingstorage/>\n"
    servers.append(start(tmp_path, conf, sock, env={"ZEO_MSGPACK": "1"}))
    with WireClient(sock) as c:
        assert c.greeting == b"M5"


def test_transaction_timeout_closes_the_lock_holder(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    conf = f"<zeo>\n  address {sock}\n  transaction-timeout 1\n</zeo>\n" + fs_conf(tmp_path)
    s = start(tmp_path, conf, sock)
    servers.append(s)
    assert ruok(sock)[1]["1"]["timeout-thread-is-alive"] is True
    with WireClient(sock, timeout=30) as c:
        c.call("register", "1", False)
        (oid,) = c.call("new_oids", 1)
        c.async_call("tpc_begin", 1, "", "", {}, None, " ")
        c.async_call("storea", oid, b"\0" * 8, b"data", 1)
        c.call("vote", 1)  # the commit lock is now held
        assert c.is_closed(timeout=30)
    # The lock was released: another client commits.
    with WireClient(sock) as c:
        c.call("register", "1", False)
        (oid,) = c.call("new_oids", 1)
        c.async_call("tpc_begin", 2, "", "", {}, None, " ")
        c.async_call("storea", oid, b"\0" * 8, b"data", 2)
        c.call("vote", 2)
        tid = c.call("tpc_finish", 2)
        assert isinstance(tid, bytes) and len(tid) == 8
    assert "Transaction timeout after 1" in s.log()


def test_command_line_only(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    s = ServerProcess([*RUNZEO, "-a", sock, "-f", str(tmp_path / "a.fs"), "-f",
                       str(tmp_path / "b.fs"), "-t", "30", "--pid-file",
                       str(tmp_path / "zeo.pid")], sock, tmp_path / "zeo.log")
    servers.append(s)
    assert sorted(ruok(sock)[1]) == ["1", "2"]
    assert (tmp_path / "zeo.pid").read_text().strip() == str(s.proc.pid)
    assert ruok(sock)[1]["1"]["timeout-thread-is-alive"] is True


def test_test_option_exits_at_once(tmp_path):
    sock = tmp_path / "zeo.sock"
    (tmp_path / "zeo.conf").write_text(f"<zeo>\n  address {sock}\n</zeo>\n{fs_conf(tmp_path)}")
    result = run_runzeo("-C", str(tmp_path / "zeo.conf"), "--test")
    assert result.returncode == 0, result.stderr
    assert "testing exit immediately" in result.stdout
    assert (tmp_path / "Data.fs").exists()
    assert not sock.exists()


def test_eventlog_file(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    log = tmp_path / "events.log"
    conf = (f"<zeo>\n  address {sock}\n</zeo>\n<mappingstorage/>\n"
            f"<eventlog>\n  level INFO\n  <logfile>\n    path {log}\n  </logfile>\n</eventlog>\n")
    servers.append(start(tmp_path, conf, sock))
    wait_for_log(log, "serving 1 (MappingStorage")


# --- signals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, status, message", [
    (signal.SIGTERM, 0, "terminated by SIGTERM"),
    (signal.SIGINT, 0, "terminated by SIGINT"),
    (signal.SIGHUP, 1, "restarted by SIGHUP"),
])
def test_stop_signals(tmp_path, servers, sig, status, message):
    sock = tmp_path / "zeo.sock"
    pid_file = tmp_path / "zeo.pid"
    conf = (f"<zeo>\n  address {sock}\n  pid-filename {pid_file}\n</zeo>\n" + fs_conf(tmp_path))
    s = start(tmp_path, conf, str(sock))
    servers.append(s)
    assert pid_file.read_text().strip() == str(s.proc.pid)
    # A transaction in progress holding the commit lock is aborted by the shutdown.
    c = WireClient(str(sock), timeout=30)
    c.call("register", "1", False)
    (oid,) = c.call("new_oids", 1)
    c.async_call("tpc_begin", 1, "", "", {}, None, " ")
    c.async_call("storea", oid, b"\0" * 8, b"data", 1)
    c.call("vote", 1)
    assert wait_exit_after(s, sig) == status
    assert c.is_closed()
    c.close()
    assert message in s.log()
    assert "Traceback" not in s.log()
    assert not sock.exists()
    assert not pid_file.exists()
    # Storage closed cleanly: its lock file no longer names the process.
    assert (tmp_path / "Data.fs.lock").read_text().strip() == ""
    # Nothing was committed.
    restarted = start(tmp_path, conf, str(sock), name="again")
    servers.append(restarted)
    assert ruok(str(sock))[1]["1"]["last-transaction"] == "0" * 16
    assert "taking over" not in restarted.log()


def test_sigusr2_reopens_log_files(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    log = tmp_path / "events.log"
    conf = (f"<zeo>\n  address {sock}\n</zeo>\n<mappingstorage/>\n"
            f"<eventlog>\n  level INFO\n  <logfile>\n    path {log}\n  </logfile>\n</eventlog>\n")
    s = start(tmp_path, conf, sock)
    servers.append(s)
    wait_for_log(log, "serving")
    rotated = tmp_path / "events.log.1"
    log.rename(rotated)
    s.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not (log.exists() and "reopened" in log.read_text()):
        assert time.monotonic() < deadline, "log file not reopened"
        time.sleep(0.05)
    assert "serving" in rotated.read_text()
    assert s.proc.poll() is None
    ruok(sock)[1]  # still serving


def test_sigusr2_without_eventlog_keeps_serving(tmp_path, servers):
    sock = str(tmp_path / "zeo.sock")
    s = start(tmp_path, f"<zeo>\n  address {sock}\n</zeo>\n<mappingstorage/>\n", sock)
    servers.append(s)
    s.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while "SIGUSR2" not in s.log():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert s.proc.poll() is None
    assert ruok(sock)[1]


# --- refusing to start --------------------------------------------------------------------------


def test_refuses_a_filestorage_held_by_another_server(tmp_path, servers):
    sock = str(tmp_path / "a.sock")
    first = start(tmp_path, f"<zeo>\n  address {sock}\n</zeo>\n{fs_conf(tmp_path)}", sock)
    servers.append(first)
    (tmp_path / "b.conf").write_text(
        f"<zeo>\n  address {tmp_path / 'b.sock'}\n</zeo>\n{fs_conf(tmp_path)}")
    result = run_runzeo("-C", str(tmp_path / "b.conf"))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"process {first.proc.pid}" in last and "Data.fs" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "b.sock").exists()
    assert first.proc.poll() is None
    assert ruok(sock)[1]


def test_refuses_an_address_in_use(tmp_path, servers):
    port = free_port()
    conf = f"<zeo>\n  address 127.0.0.1:{port}\n</zeo>\n<mappingstorage/>\n"
    servers.append(start(tmp_path, conf, ("127.0.0.1", port)))
    (tmp_path / "b.conf").write_text(conf)
    result = run_runzeo("-C", str(tmp_path / "b.conf"))
    assert result.returncode == 2
    assert f"127.0.0.1:{port} already in use" in result.stderr


def test_refuses_a_pid_file_of_a_running_server(tmp_path, servers):
    pid_file = tmp_path / "zeo.pid"
    sock = str(tmp_path / "a.sock")
    first = start(tmp_path, f"<zeo>\n  address {sock}\n  pid-filename {pid_file}\n</zeo>\n"
                  "<mappingstorage/>\n", sock)
    servers.append(first)
    (tmp_path / "b.conf").write_text(
        f"<zeo>\n  address {tmp_path / 'b.sock'}\n  pid-filename {pid_file}\n</zeo>\n"
        "<mappingstorage/>\n")
    result = run_runzeo("-C", str(tmp_path / "b.conf"))
    assert result.returncode == 2
    assert f"process {first.proc.pid}" in result.stderr
    assert pid_file.read_text().strip() == str(first.proc.pid)


def test_takes_over_stale_lock_pid_and_socket_files(tmp_path, servers):
    pid = dead_pid()
    sock = tmp_path / "zeo.sock"
    pid_file = tmp_path / "zeo.pid"
    conf = f"<zeo>\n  address {sock}\n  pid-filename {pid_file}\n</zeo>\n" + fs_conf(tmp_path)
    # A crashed server's leftovers: its socket file, pid file and FileStorage lock file.
    import socket as socketmod

    with socketmod.socket(socketmod.AF_UNIX) as leftover:
        leftover.bind(str(sock))
    pid_file.write_text(f"{pid}\n")
    (tmp_path / "Data.fs.lock").write_text(f" {pid}\n")
    s = start(tmp_path, conf, str(sock))
    servers.append(s)
    log = s.log()
    assert f"stale pid file {pid_file} of process {pid}" in log
    assert f"lock file {tmp_path / 'Data.fs.lock'} of process {pid}" in log
    assert "WARNING" in log
    assert pid_file.read_text().strip() == str(s.proc.pid)
    assert ruok(str(sock))[1]


# --- the sample configuration -----------------------------------------------------------------


def test_sample_config_runs_as_is(tmp_path):
    """zeo.conf.sample, copied into a directory with ./var, serves a FileStorage in ./var."""
    shutil.copy(REPO / "zeo.conf.sample", tmp_path / "zeo.conf")
    (tmp_path / "var").mkdir()
    sock = str(tmp_path / "zeo.sock")
    # Only the address changes (tests must not take a fixed port).
    with open(tmp_path / "zeo.log", "wb") as log:
        proc = subprocess.Popen([*RUNZEO, "-C", "zeo.conf", "-a", sock], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_address(sock, proc=proc)
            assert list(ruok(sock)[1]) == ["1"]
            assert (tmp_path / "var" / "Data.fs").exists()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert "serving 1 (FileStorage" in (tmp_path / "zeo.log").read_text()


def test_sample_config_parses_unchanged(tmp_path, monkeypatch):
    from ZEO import runzeo

    (tmp_path / "var").mkdir()
    monkeypatch.chdir(tmp_path)
    o = runzeo.options_from_config(runzeo.load_config(str(REPO / "zeo.conf.sample")))
    assert o.addresses == [("127.0.0.1", 8100)]
    assert [s.storage_id for s in o.storages] == ["1"]
    assert o.storages[0].paths == [os.path.join(".", "var", "Data.fs")]
    assert o.eventlog is not None


# --- TLS ----------------------------------------------------------------------------------------


def test_tls_server_from_config(tmp_path, servers):
    """<ssl> in <zeo>: clients must present a certificate signed by the configured CA."""
    import socket as socketmod
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem"))
    port = free_port()
    conf = (f"<zeo>\n  address 127.0.0.1:{port}\n  <ssl>\n"
            f"    certificate {tmp_path / 'server.pem'}\n"
            f"    authenticate {tmp_path / 'ca.pem'}\n  </ssl>\n</zeo>\n<mappingstorage/>\n")
    s = start(tmp_path, conf, ("127.0.0.1", port))
    servers.append(s)

    def greeting(with_client_cert: bool) -> bytes:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        if with_client_cert:
            client = ca.issue_cert("client@example.com")
            client.configure_cert(ctx)
        with socketmod.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                data = b""
                while len(data) < 6:
                    chunk = tls.recv(6 - len(data))
                    if not chunk:
                        break
                    data += chunk
                return data

    assert greeting(True) == b"\0\0\0\x02Z5"
    assert "TLS" in [ln for ln in s.log().splitlines() if "serving" in ln][0]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        if greeting(False) != b"\0\0\0\x02Z5":
            raise ConnectionError("refused")


def test_metrics_without_prometheus_client_is_a_one_line_startup_error(tmp_path):
    """Exit 2 and one line (a supervisor does not restart on it), not a traceback."""
    import sys

    conf = tmp_path / "zeo.conf"
    conf.write_text("<zeo>\n  address 127.0.0.1:0\n  <metrics>\n    address 0\n  </metrics>\n"
                    "</zeo>\n<mappingstorage/>\n")
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from ZEO.runzeo import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "-C", str(conf)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "prometheus_client" in line and line.startswith("runzeo: error:")


def test_bad_conflict_resolution_class_is_a_startup_error(tmp_path):
    conf = tmp_path / "zeo.conf"
    conf.write_text("<zeo>\n  address 127.0.0.1:0\n  conflict-resolution-class nodots\n"
                    "</zeo>\n<mappingstorage/>\n")
    result = run_runzeo("-C", str(conf))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "nodots" in result.stderr


def test_log_lines_use_zeos_logger_names(tmp_path, servers):
    """Operators' log monitoring greps ZEO 6's logger names and key messages (issue 22)."""
    log = tmp_path / "zeo.log"
    port = free_port()
    conf = (f"<zeo>\n  address 127.0.0.1:{port}\n</zeo>\n<mappingstorage/>\n"
            f"<eventlog>\n  level INFO\n  <logfile>\n    path {log}\n"
            "    format %(name)s %(message)s\n  </logfile>\n</eventlog>\n")
    servers.append(start(tmp_path, conf, ("127.0.0.1", port)))
    wait_for_log(log, "listening on")
    text = log.read_text()
    assert "ZEO.StorageServer StorageServer created RW with storages: 1:RW:" in text
    assert f"ZEO.asyncio.server listening on 127.0.0.1:{port}" in text


def test_warns_in_one_line_when_zeo_is_installed_beside_us(tmp_path):
    """pip lets ZEO and zeo-ng both own the ZEO package; runzeo says so at start."""
    site = tmp_path / "site"
    (site / "ZEO-6.2.dist-info").mkdir(parents=True)
    conf = tmp_path / "zeo.conf"
    conf.write_text("<zeo>\n  address 127.0.0.1:0\n</zeo>\n<mappingstorage/>\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([*RUNZEO, "-C", str(conf), "--test"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0
    [line] = [x for x in result.stderr.splitlines() if "ZEO 6.2" in x]
    assert line.startswith("runzeo: warning:") and "pip uninstall ZEO" in line
    clean = subprocess.run([*RUNZEO, "-C", str(conf), "--test"], capture_output=True,
                           text=True, timeout=60)
    assert "pip uninstall" not in clean.stderr
