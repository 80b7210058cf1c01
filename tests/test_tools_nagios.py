"""zeo-nagios against live servers (ours and the real ZEO 6.2) and dead addresses."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.refzeo import ref_bin
from support.servers import free_port, start_server
from support.wire import commit_one
from ZEO import nagios

NAGIOS = [sys.executable, "-m", "ZEO.nagios"]


def run(*args: str, cmd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*(cmd or NAGIOS), *args], capture_output=True, text=True,
                          timeout=60)




@pytest.fixture(params=["ours", "ref"])
def two_storages(request, tmp_path):
    sock = str(tmp_path / "zeo.sock")
    server = start_server(request.param, tmp_path, "<mappingstorage 1/>\n<mappingstorage b/>",
                          addr=sock)
    yield server
    server.stop()


def test_empty_storages_warn_and_metrics(two_storages):
    addr = two_storages.addr
    result = run(addr)
    assert result.returncode == 1
    assert result.stdout == "Empty storage '1'\nEmpty storage 'b'\n"
    result = run("-m", addr)
    assert result.returncode == 1
    assert result.stdout == (
        "Empty storage '1'|active_txns=0\n"
        "Empty storage 'b'\n"
        "| connections=0\n"
        " waiting=0\n"
        " b:active_txns=0\n"
        " b:connections=0\n"
        " b:waiting=0\n"
    )
    commit_one(addr, "1")
    assert run(addr).stdout == "Empty storage 'b'\n"
    commit_one(addr, "b")
    result = run(addr)
    assert (result.returncode, result.stdout) == (0, "OK\n")


def test_same_output_as_the_real_zeo_nagios(two_storages):
    addr = two_storages.addr
    commit_one(addr, "b")
    for args in ([addr], ["-m", addr]):
        ours, ref = run(*args), run(*args, cmd=[str(ref_bin("zeo-nagios"))])
        assert (ours.returncode, ours.stdout) == (ref.returncode, ref.stdout)


def test_rate_metrics_from_the_status_file(tmp_path):
    server = start_server("ours", tmp_path, "<mappingstorage 1/>", addr=str(tmp_path / "s"))
    try:
        status = str(tmp_path / "status.json")
        first = run("-m", "-s", status, "-u", "seconds", server.addr)
        assert first.returncode == 1
        assert "commits=" not in first.stdout  # no previous sample yet
        commit_one(server.addr)
        second = run("-m", "-s", status, "-u", "hours", server.addr)
        assert second.returncode == 0
        lines = second.stdout.splitlines()
        assert lines[0] == "OK|active_txns=0"
        rates = dict(line.strip(" |").split("=") for line in lines[1:])
        assert set(rates) == {"connections", "waiting", "aborts", "commits", "conflicts",
                              "conflicts_resolved", "loads", "stores"}
        assert float(rates["commits"]) > 0 and float(rates["aborts"]) == 0
        assert float(rates["stores"]) > 0
    finally:
        server.stop()


def test_dead_servers_are_critical(tmp_path):
    result = run(str(tmp_path / "no-such.sock"))
    assert result.returncode == 2
    assert result.stdout.startswith("Can't connect")
    result = run(f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "Can't connect" in result.stdout and "refused" in result.stdout


def test_usage_errors_are_unknown():
    result = run()
    assert result.returncode == 3
    assert "address" in result.stderr and "Traceback" not in result.stderr
    result = run("-u", "fortnights", "x.sock")
    assert result.returncode == 3
    help_result = run("-h")
    assert help_result.returncode == 0
    for option in ("--output-metrics", "--status-path", "--time-units"):
        assert option in help_result.stdout


def test_format_output():
    assert nagios.format_output(["OK"], []) == "OK"
    assert nagios.format_output(["OK"], ["a=1"]) == "OK|a=1"
    assert nagios.format_output(["OK"], ["a=1", "b=2", "c=3"]) == "OK|a=1\n| b=2\n c=3"


def test_silent_port_is_critical_within_the_timeout():
    """A port that accepts and says nothing: CRITICAL after --timeout, not a hang (issue 22)."""
    import socket
    import time

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        t0 = time.monotonic()
        result = run("--timeout", "1", f"127.0.0.1:{port}")
        assert result.returncode == 2
        assert result.stdout.startswith("Can't connect")
        assert time.monotonic() - t0 < 10
    finally:
        listener.close()
