"""zeoctl under a real zdaemon: start, status, logreopen, restart, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from support.servers import wait_for_address
from ZEO.wire import ruok

ZEOCTL = [sys.executable, "-m", "ZEO.zeoctl"]




@pytest.fixture
def zeoctl(tmp_path):
    """Run zeoctl commands on a config with a <runner>; stops the daemon at the end."""
    conf = tmp_path / "zeo.conf"
    conf.write_text(f"""
<zeo>
  address {tmp_path}/zeo.sock
  pid-filename {tmp_path}/zeo.pid
</zeo>
<filestorage 1>
  path {tmp_path}/Data.fs
</filestorage>
<eventlog>
  <logfile>
    path {tmp_path}/zeo.log
  </logfile>
</eventlog>
<runner>
  program {sys.executable} -m ZEO.runzeo -C {conf}
  socket-name {tmp_path}/zdsock
  transcript {tmp_path}/transcript.log
  stop-timeout 30
  start-timeout 60
</runner>
""")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*ZEOCTL, "-C", str(conf), *args], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)

    yield run
    result = run("status")
    if "program running" in result.stdout or "daemon manager" in result.stdout:
        run("stop")


def program_pid(status_output: str) -> int:
    assert "program running; pid=" in status_output, status_output
    return int(status_output.split("pid=")[1].split()[0])


def test_start_status_logreopen_restart_stop(zeoctl, tmp_path):
    sock = str(tmp_path / "zeo.sock")
    result = zeoctl("start")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "daemon process started" in result.stdout
    wait_for_address(sock)
    pid = program_pid(zeoctl("status").stdout)
    assert (tmp_path / "zeo.pid").read_text().strip() == str(pid)
    assert list(ruok(sock)[1]) == ["1"]

    log = tmp_path / "zeo.log"
    log.rename(tmp_path / "zeo.log.1")
    result = zeoctl("logreopen")
    assert result.returncode == 0
    assert "SIGUSR2" in result.stdout
    deadline = time.monotonic() + 30
    while not (log.exists() and "reopened" in log.read_text()):
        assert time.monotonic() < deadline, "log not reopened"
        time.sleep(0.05)
    assert program_pid(zeoctl("status").stdout) == pid  # still the same server

    result = zeoctl("restart")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_address(sock)
    new_pid = program_pid(zeoctl("status").stdout)
    assert new_pid != pid
    assert list(ruok(sock)[1]) == ["1"]

    result = zeoctl("stop")
    assert result.returncode == 0
    assert "daemon process stopped" in result.stdout
    assert "not running" in zeoctl("status").stdout
    assert not os.path.exists(sock)
    assert not (tmp_path / "zeo.pid").exists()
    assert "terminated by SIGTERM" in log.read_text()


def test_zeoctl_requires_a_runner(tmp_path):
    conf = tmp_path / "zeo.conf"
    conf.write_text(f"<zeo>\n  address {tmp_path}/s\n</zeo>\n<mappingstorage main/>\n")
    result = subprocess.run([*ZEOCTL, "-C", str(conf), "status"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "runner" in result.stderr


def test_help_prints_usage():
    result = subprocess.run([*ZEOCTL, "-h"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: zeoctl -C zeo.conf")
    assert "logreopen" in result.stdout and "zdctl's options" not in result.stdout


def test_example_config_parses_for_zeoctl_and_runzeo(tmp_path):
    """examples/zeoctl.conf, with its paths moved to a scratch directory, is read by both."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "examples" / "zeoctl.conf").read_text()
    text = text.replace("%define ETC /etc/zeo", f"%define ETC {tmp_path}").replace(
        "%define VAR /var/lib/zeo", f"%define VAR {tmp_path}")
    conf = tmp_path / "zeoctl.conf"
    conf.write_text(text)
    status = subprocess.run([*ZEOCTL, "-C", str(conf), "status"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert "daemon manager not running" in status.stdout, status.stdout + status.stderr
    test = subprocess.run([sys.executable, "-m", "ZEO.runzeo", "-C", str(conf), "--test"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert test.returncode == 0, test.stderr
