"""Every file in examples/ (shown in the docs by literalinclude) is exercised here, for real:
the application against our server and ZEO 6.2, the production and TLS configurations under
runzeo, the zdaemon configuration under zdaemon; the systemd and supervisord files are checked
against what runzeo does (they cannot run here)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from support.servers import (
    ServerProcess,
    filestorage_conf,
    free_port,
    start_server,
    wait_for_address,
)
from ZEO.runzeo import EXIT_USAGE

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
SRC = str(REPO / "src")
ENV = dict(os.environ, PYTHONPATH=SRC)

#: The example files this module exercises; test_docs checks the docs include no others.
TESTED_EXAMPLES = {"app.py", "quickstart.conf", "zeo.conf", "zdaemon.conf", "zeo.service",
                   "supervisord.conf", "tls/zeo.conf", "tls/client.conf", "tls/client.py",
                   "zeoctl.conf",  # zeoctl.conf: tests/test_tools_zeoctl.py
                   "relstorage/zeo.conf", "fleet/zeo.conf", "fleet/zeo@.service"}


def test_every_example_is_tested():
    files = {str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*") if p.is_file()
             and "__pycache__" not in p.parts and not p.name.startswith(".")}
    assert files == TESTED_EXAMPLES


def run_py(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=90,
                       env=ENV, cwd=cwd)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r


def redefine(text: str, **defines: str) -> str:
    """The example with its ``%define NAME value`` lines pointing at test directories."""
    for name, value in defines.items():
        text, n = re.subn(rf"^%define {name} .*$", f"%define {name} {value}", text, flags=re.M)
        assert n == 1, name
    return text


@pytest.mark.parametrize("kind", ["ours", "ref"])
def test_app_against_a_server(kind, tmp_path):
    with start_server(kind, tmp_path, filestorage_conf(tmp_path / "Data.fs")) as srv:
        address = f"{srv.addr[0]}:{srv.addr[1]}"
        assert run_py(str(EXAMPLES / "app.py"), address).stdout == ""
        run_py(str(EXAMPLES / "app.py"), address, "hello", "world")
        out = run_py(str(EXAMPLES / "app.py"), address, "second").stdout
        assert out == "1. hello world\n2. second\n"


def test_quickstart_config(tmp_path, monkeypatch):
    port = free_port()
    text = (EXAMPLES / "quickstart.conf").read_text()
    (tmp_path / "zeo.conf").write_text(text.replace("127.0.0.1:8100", f"127.0.0.1:{port}"))
    monkeypatch.chdir(tmp_path)  # "path Data.fs" is relative to where runzeo runs
    with ServerProcess([sys.executable, "-m", "ZEO.runzeo", "-C", "zeo.conf"],
                       ("127.0.0.1", port), tmp_path / "runzeo.out", env=ENV):
        run_py(str(EXAMPLES / "app.py"), f"127.0.0.1:{port}", "quick")
    assert (tmp_path / "Data.fs").stat().st_size > 4


def production_config(tmp_path: Path) -> tuple[Path, tuple[str, int], int]:
    var = tmp_path / "var"
    var.mkdir()
    port, metrics_port = free_port(), free_port()
    text = redefine((EXAMPLES / "zeo.conf").read_text(), VAR=str(var))
    text = text.replace("address 0.0.0.0:8100", f"address 127.0.0.1:{port}")
    text = text.replace("address 127.0.0.1:9100", f"address 127.0.0.1:{metrics_port}")
    conf = tmp_path / "zeo.conf"
    conf.write_text(text)
    return conf, ("127.0.0.1", port), metrics_port


def test_production_config(tmp_path):
    conf, addr, metrics_port = production_config(tmp_path)
    var = tmp_path / "var"
    srv = ServerProcess([sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)], addr,
                        tmp_path / "runzeo.out", env=ENV)
    try:
        run_py(str(EXAMPLES / "app.py"), f"{addr[0]}:{addr[1]}", "from the example")
        assert (var / "zeo.pid").read_text().strip() == str(srv.proc.pid)
        assert "opening storage" in (var / "zeo.log").read_text()
        clients = run_py("-m", "ZEO.cli", "--admin", str(var / "admin.sock"), "status",
                         "--json").stdout
        assert json.loads(clients)["storages"]["1"]["commits"] == 2  # root, then the entry
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as r:
            assert 'zeo_commits_total{storage="1"} 2.0' in r.read().decode()
    finally:
        assert srv.stop() == 0
    assert not (var / "zeo.pid").exists()


def test_relstorage_config(tmp_path, postgres):
    """examples/relstorage/zeo.conf, pointed at the test cluster, serves the example app."""
    port = free_port()
    text = (EXAMPLES / "relstorage" / "zeo.conf").read_text()
    text = text.replace("address 127.0.0.1:8100", f"address 127.0.0.1:{port}")
    text = text.replace("blob-dir var/blobs", f"blob-dir {tmp_path / 'blobs'}")
    dsn = postgres.create_database()
    text = re.sub(r"dsn .*", f"dsn {dsn}", text)
    conf = tmp_path / "zeo.conf"
    conf.write_text(text)
    srv = ServerProcess([sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)],
                        ("127.0.0.1", port), tmp_path / "runzeo.out", env=ENV)
    try:
        out = run_py(str(EXAMPLES / "app.py"), f"127.0.0.1:{port}", "from PostgreSQL").stdout
        assert "from PostgreSQL" in out
    finally:
        assert srv.stop() == 0


def test_fleet_config_and_unit(tmp_path, postgres):
    """Two servers from examples/fleet/zeo.conf, started as the systemd template does (-a
    PORT), over one database: a commit through one reaches a client of the other."""
    import configparser as cp

    unit = cp.ConfigParser(interpolation=None)
    unit.read(EXAMPLES / "fleet" / "zeo@.service")
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert os.path.basename(argv[0]) in _console_scripts()
    assert argv[1:] == ["-C", "/etc/zeo/fleet.conf", "-a", "127.0.0.1:%i"]
    dsn = postgres.create_database()
    text = redefine((EXAMPLES / "fleet" / "zeo.conf").read_text(), DSN=dsn)
    text = text.replace("blob-dir /var/cache/zeo/blobs", f"blob-dir {tmp_path / 'blobs'}")
    conf = tmp_path / "fleet.conf"
    conf.write_text(text)
    servers = []
    try:
        for _ in range(2):
            port = free_port()
            servers.append(ServerProcess(
                [sys.executable, "-m", "ZEO.runzeo", *argv[1:2], str(conf), "-a",
                 f"127.0.0.1:{port}"], ("127.0.0.1", port), tmp_path / f"{port}.out", env=ENV))
        run_py(str(EXAMPLES / "app.py"), "127.0.0.1:%d" % servers[0].addr[1], "through one")
        out = run_py(str(EXAMPLES / "app.py"), "127.0.0.1:%d" % servers[1].addr[1]).stdout
        assert "through one" in out
    finally:
        for srv in servers:
            assert srv.stop() == 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """Files named as in examples/tls: one CA signs the server's and the client's certs."""
    trustme = pytest.importorskip("trustme", reason="trustme makes the test certificates")
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("zeo.example.com")
    client = ca.issue_cert("client@example.com")
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    ca.cert_pem.write_to_path(str(d / "clients-ca.pem"))
    ca.cert_pem.write_to_path(str(d / "server-ca.pem"))
    return d


@pytest.mark.parametrize("kind", ["ours", "ref"])
def test_tls_deployment(kind, tmp_path, certs):
    from support.refzeo import ref_bin, ref_python

    port = free_port()
    server_conf = redefine((EXAMPLES / "tls" / "zeo.conf").read_text(), CERTS=str(certs),
                           VAR=str(tmp_path))
    server_conf = server_conf.replace("address 0.0.0.0:8100", f"address 127.0.0.1:{port}")
    (tmp_path / "zeo.conf").write_text(server_conf)
    client_conf = redefine((EXAMPLES / "tls" / "client.conf").read_text(), CERTS=str(certs))
    client_conf = client_conf.replace("server zeo.example.com:8100", f"server 127.0.0.1:{port}")
    (tmp_path / "client.conf").write_text(client_conf)
    runzeo = ([sys.executable, "-m", "ZEO.runzeo"] if kind == "ours"
              else [str(ref_bin("runzeo"))])
    with ServerProcess([*runzeo, "-C", str(tmp_path / "zeo.conf")], ("127.0.0.1", port),
                       tmp_path / "runzeo.out", env=ENV if kind == "ours" else None):
        # The client program, with our client and then with ZEO 6.2's.
        program = [str(EXAMPLES / "tls" / "client.py"), str(tmp_path / "client.conf")]
        ref_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        runs = [(sys.executable, ENV), (sys.executable, ENV), (str(ref_python()), ref_env)]
        for visits, (python, env) in enumerate(runs, 1):
            r = subprocess.run([python, *program], capture_output=True, text=True, timeout=90,
                               env=env)
            assert r.stdout == f"visits: {visits}\n", r.stderr
        tls = ["--ssl-ca", str(certs / "server-ca.pem"), "--ssl-cert", str(certs / "client.pem"),
               "--ssl-key", str(certs / "client.key"), "--server-hostname", "zeo.example.com"]
        r = run_py("-m", "ZEO.cli", f"127.0.0.1:{port}", "ping", "-n", "1", *tls)
        assert r.stdout.startswith(f"connected to 127.0.0.1:{port} (Z5)")
        # Without a client certificate the server refuses the connection.
        r = subprocess.run([sys.executable, "-m", "ZEO.cli", f"127.0.0.1:{port}", "ping",
                            *tls[:2], "--server-hostname", "zeo.example.com"],
                           capture_output=True, text=True, timeout=60, env=ENV)
        assert r.returncode == 3, (r.stdout, r.stderr)


def test_zdaemon_config(tmp_path):
    conf, addr, _ = production_config(tmp_path)
    var = tmp_path / "var"
    text = redefine((EXAMPLES / "zdaemon.conf").read_text(), ETC=str(tmp_path), VAR=str(var))
    # The example runs the installed console script; here, this checkout's runzeo.
    text = text.replace("program runzeo", f"program {sys.executable} -m ZEO.runzeo")
    zd_conf = tmp_path / "zdaemon.conf"
    zd_conf.write_text(text)

    def zdaemon(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zdaemon.zdctl", "-C", str(zd_conf), *args],
                              capture_output=True, text=True, timeout=60, env=ENV)

    try:
        r = zdaemon("start")
        assert r.returncode == 0, (r.stdout, r.stderr)
        wait_for_address(addr, timeout=30)
        assert "program running" in zdaemon("status").stdout
        run_py("-m", "ZEO.cli", f"{addr[0]}:{addr[1]}", "ping", "-n", "1")
    finally:
        zdaemon("stop")
    assert "not running" in zdaemon("status").stdout
    assert not (var / "zeo.pid").exists()


def _console_scripts() -> set[str]:
    """Names under [project.scripts] in pyproject.toml (Python 3.10 has no tomllib)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def test_systemd_unit_matches_runzeo(tmp_path):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(EXAMPLES / "zeo.service")
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert os.path.basename(argv[0]) in _console_scripts()
    assert argv[1:] == ["-C", "/etc/zeo/zeo.conf"]
    assert svc["ExecReload"] == "/bin/kill -USR2 $MAINPID"  # runzeo reopens logs on USR2
    assert svc["RestartPreventExitStatus"] == str(EXIT_USAGE)
    assert svc["Restart"] == "on-failure"  # exit 1 (SIGHUP) restarts, 0 (SIGTERM) does not
    # The options it passes are what runzeo accepts: check them on the example config.
    conf, _, _ = production_config(tmp_path)
    r = subprocess.run([sys.executable, "-m", "ZEO.runzeo", *argv[1:-1], str(conf), "--test"],
                       capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0 and "testing exit immediately" in r.stdout, r.stderr


def test_supervisord_program_matches_runzeo():
    conf = configparser.ConfigParser(strict=False, interpolation=None)
    conf.read(EXAMPLES / "supervisord.conf")
    prog = conf["program:zeo"]
    argv = shlex.split(prog["command"])
    assert os.path.basename(argv[0]) in _console_scripts() and argv[1] == "-C"
    codes = {int(c) for c in prog["exitcodes"].split(",")}
    assert codes == {0, EXIT_USAGE}  # 1 (after SIGHUP) is unexpected: restart
    assert prog["stopsignal"] == "TERM"
