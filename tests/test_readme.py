"""The README's set-up commands work literally (issue 22): the server command is run as
written, in a scratch copy of the repository, with a fresh virtualenv."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The literal blocks of the README's Quick start that are shell commands."""
    text = (REPO / "README.rst").read_text()
    quick = text.split("Quick start\n-----------\n", 1)[1].split("\nThen, from Python", 1)[0]
    return [m.strip() for m in re.findall(r"::\n\n((?:    .+\n)+)", quick)]


def test_the_readme_names_the_ci_command():
    server, tests = readme_commands()
    assert tests == "./tools/test.sh"
    assert "tools/test.sh" in (REPO / ".ci" / "run").read_text()
    assert server.startswith("python3 -m venv .venv && ")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(600)
def test_the_server_command_works_as_written(tmp_path):
    if not _port_free(8100):
        pytest.skip("something else listens on 127.0.0.1:8100, the sample config's port")
    server_cmd = readme_commands()[0]
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    work = tmp_path / "zeo-ng"
    for name in files:
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    proc = subprocess.Popen(["bash", "-c", server_cmd], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = []
        for line in proc.stdout:  # pip's output, then the server's log
            out.append(line)
            if "listening on 127.0.0.1:8100" in line:
                break
        else:
            raise AssertionError("the server did not start:\n" + "".join(out[-40:]))
        # The installed client talks to it (the venv's own python, as a user would).
        script = ("import ZEO, transaction; c = ZEO.connection(8100); c.root.x = 1; "
                  "transaction.commit(); print(c.root.x); c.close()")
        r = subprocess.run([str(work / ".venv" / "bin" / "python"), "-c", script],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.stdout.strip() == "1", r.stderr
        assert (work / "var" / "Data.fs").exists()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
