"""zeopack against a live server (every address form) and against dead addresses."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import ZODB
from ZODB.FileStorage import FileStorage

from support.servers import ServerProcess, free_port
from ZEO.scripts import zeopack

ZEOPACK = [sys.executable, "-m", "ZEO.scripts.zeopack"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ZEOPACK, *args], capture_output=True, text=True, timeout=120)


def make_history(path, revisions: int = 20) -> None:
    """A FileStorage whose root was rewritten ``revisions`` times (garbage for pack)."""
    db = ZODB.DB(FileStorage(str(path)))
    try:
        with db.transaction() as conn:
            conn.root.payload = b"x" * 1000
        for i in range(revisions):
            with db.transaction() as conn:
                conn.root.counter = i
                conn.root.payload = b"%d" % i * 1000
    finally:
        db.close()


@pytest.fixture
def server(tmp_path):
    make_history(tmp_path / "Data.fs")
    port = free_port()
    sock = str(tmp_path / "zeo.sock")
    conf = tmp_path / "zeo.conf"
    conf.write_text(f"<zeo>\n  address 127.0.0.1:{port}\n  address {sock}\n</zeo>\n"
                    f"<filestorage 1>\n  path {tmp_path / 'Data.fs'}\n</filestorage>\n"
                    f"<filestorage other>\n  path {tmp_path / 'other.fs'}\n</filestorage>\n")
    s = ServerProcess([sys.executable, "-m", "ZEO.runzeo", "-C", str(conf)], sock,
                      tmp_path / "zeo.log")
    s.port = port
    yield s
    s.stop()


def test_pack_shrinks_the_storage(server, tmp_path):
    data = tmp_path / "Data.fs"
    before = data.stat().st_size
    result = run("-d", "1", f"127.0.0.1:{server.port}")
    assert result.returncode == 0, result.stderr
    assert data.stat().st_size == before  # everything is younger than a day
    result = run(f"127.0.0.1:{server.port}")
    assert result.returncode == 0, result.stderr
    assert data.stat().st_size < before / 3
    assert (tmp_path / "Data.fs.old").exists()


@pytest.mark.parametrize("form", [
    "host:port", "host:port:name", "port", "port:name", "-u", "-u:name", "-h -p", "-U -S"])
def test_address_forms(server, tmp_path, form):
    port, sock = server.port, server.addr
    args = {
        "host:port": [f"127.0.0.1:{port}"],
        "host:port:name": [f"127.0.0.1:{port}:other"],
        "port": [str(port)],
        "port:name": [f"{port}:other"],
        "-u": ["-u", sock],
        "-u:name": ["-u", f"{sock}:other"],
        "-h -p": ["-h", "127.0.0.1", "-p", str(port)],
        "-U -S": ["-U", sock, "-S", "other"],
    }[form]
    before = (tmp_path / "Data.fs").stat().st_size
    result = run(*args)
    assert result.returncode == 0, result.stderr
    packed_main = (tmp_path / "Data.fs").stat().st_size < before
    assert packed_main == ("other" not in " ".join(args))


def test_several_servers_and_one_dead(server, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    result = run("--timeout", "1", dead, f"127.0.0.1:{server.port}")
    assert result.returncode == 1
    assert f"no server answered at {dead} (storage '1')" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "Data.fs.old").exists()  # the live one was still packed


def test_no_server_answers(tmp_path):
    result = run("--timeout", "1", "-u", str(tmp_path / "nothing.sock"))
    assert result.returncode == 1
    assert "no server answered" in result.stderr and "nothing.sock" in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "no server given"),
    (["localhost:notaport"], "bad server address"),
    (["-t", "25:00", "8100"], "bad time"),
    (["-h", "localhost"], "-h needs -p"),
])
def test_usage_errors(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr



def test_pack_time():
    now = time.mktime((2024, 5, 10, 12, 0, 0, 0, 0, -1))
    assert zeopack.pack_time(0, None, now) == now
    assert zeopack.pack_time(2, None, now) == now - 2 * 86400
    assert zeopack.pack_time(0, "11:30", now) == now - 1800
    # 13:00 has not come yet today: yesterday's 13:00.
    assert zeopack.pack_time(0, "13", now) == time.mktime((2024, 5, 9, 13, 0, 0, 0, 0, -1))
    assert zeopack.pack_time(1, "11:59:30", now) == now - 30 - 86400


def test_waiting_shows_progress_on_a_terminal(tmp_path):
    """On a terminal, zeopack shows a progress line while it waits for the server, and
    gives up after --timeout (issue 22)."""
    import os
    import pty
    import select
    import time

    from support.servers import free_port

    main_fd, sub_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ZEO.scripts.zeopack", "--timeout", "2",
                             f"127.0.0.1:{free_port()}"],
                            stdin=sub_fd, stdout=sub_fd, stderr=sub_fd, close_fds=True)
    os.close(sub_fd)
    out = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main_fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(main_fd)
    assert proc.wait(10) != 0
    text = out.decode(errors="replace")
    assert "connecting to 127.0.0.1:" in text and "no answer" in text
    assert "within 2s" in text
