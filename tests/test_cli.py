"""The ``zeo`` command against live servers: ours and the real ZEO 6.2 (runzeo subprocesses).

The command runs as a subprocess too, so these tests see exactly its output and exit status.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.utils import z64

from support.servers import filestorage_conf, start_server
from ZEO.cli import METHODS_BY_NAME, format_value

pytestmark = pytest.mark.timeout(120)

SRC = str(Path(__file__).resolve().parents[1] / "src")

#: zeo-facts §2.1: the methods a registered ZEO 5/6 connection answers.
REGISTERED = (
    "get_info lastTransaction getInvalidations new_oids pack loadBefore storea "
    "checkCurrentSerialInTransaction restorea storeBlobStart storeBlobChunk storeBlobEnd "
    "storeBlobShared deleteObject tpc_begin vote tpc_finish tpc_abort history record_iternext "
    "sendBlob getTid loadSerial new_oid undoa undoLog undoInfo iterator_start iterator_next "
    "iterator_record_start iterator_record_next iterator_gc server_status set_client_label ping"
).split()


def zeo(*args: str, check_status: int | None = 0, stderr=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    r = subprocess.run([sys.executable, "-m", "ZEO.cli", *args], capture_output=stderr is None,
                       stderr=stderr, text=True, timeout=60, env=env,
                       stdout=subprocess.PIPE if stderr is not None else None)
    if check_status is not None:
        assert r.returncode == check_status, (r.stdout, r.stderr)
    return r


def make_data(path: Path) -> dict:
    """A FileStorage with two revisions of the root; returns the tids."""
    db = ZODB.DB(FileStorage(str(path)))
    conn = db.open()
    conn.root()["a"] = 1
    transaction.commit()
    first = conn.root()._p_serial
    time.sleep(0.01)
    conn.root()["b"] = PersistentMapping()
    transaction.commit()
    second = conn.root()._p_serial
    conn.close()
    db.close()
    return {"first": first, "second": second}


@pytest.fixture(scope="module", params=["ours", "ref"])
def server(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"cli-{request.param}")
    tids = make_data(d / "Data.fs")
    srv = start_server(request.param, d, filestorage_conf(d / "Data.fs"))
    srv.tids = tids
    srv.text = f"{srv.addr[0]}:{srv.addr[1]}"
    yield srv
    srv.stop()


def test_methods_table_covers_the_registered_set():
    assert set(REGISTERED) | {"register"} == set(METHODS_BY_NAME)


def test_list_methods(server):
    r = zeo(server.text)
    assert r.stdout.startswith(f"ZEO server at {server.text}: protocol Z5, storages: 1\n")
    for name in REGISTERED:
        m = METHODS_BY_NAME[name]
        line = next(x for x in r.stdout.splitlines() if x[2:].startswith(m.signature + " "))
        assert m.doc in line
        assert line.startswith(" " if m.callable else "*")
    assert "  loadBefore(oid, tid)" in r.stdout


def test_read_calls(server):
    last = server.tids["second"]
    assert zeo(server.text, "lastTransaction").stdout == last.hex() + "\n"
    # Root object: current revision, then the one before the second commit.
    current = zeo(server.text, "--json", "loadBefore", "0", '"max"').stdout
    data, start, end = json.loads(current)
    assert (start, end) == (last.hex(), None)
    assert bytes.fromhex(data).startswith(b"\x80")  # a ZODB record pickle
    text = zeo(server.text, "loadBefore", "0", last.hex()).stdout.splitlines()
    assert text[0].startswith("[80")
    assert text[0].endswith(f"{server.tids['first'].hex()}, {last.hex()}]")
    assert zeo(server.text, "getTid", "0x0").stdout == last.hex() + "\n"
    history = json.loads(zeo(server.text, "--json", "history", "0", "5").stdout)
    # Newest first: both commits, then the root's creation.
    assert [h["tid"] for h in history][:2] == [last.hex(), server.tids["first"].hex()]
    assert len(history) == 3
    info = json.loads(zeo(server.text, "get_info", "--json").stdout)
    assert info["length"] == 2 and info["supportsUndo"] is True
    assert ["zope.interface", "Interface"] in info["interfaces"]
    undo = zeo(server.text, "undoLog", "0", "-20").stdout
    assert undo.count("- id: ") == 3  # both commits plus the root's creation
    status = json.loads(zeo(server.text, "--json", "server_status").stdout)
    assert status["last-transaction"] == last.hex() and status["connections"] == 1


def test_ping(server):
    r = zeo(server.text, "ping", "-n", "3")
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"connected to {server.text} (Z5) in ")
    assert [x.split(":")[0] for x in lines[1:4]] == ["ping 1", "ping 2", "ping 3"]
    assert lines[4].startswith("3 pings: min ")
    rtts = json.loads(zeo(server.text, "ping", "--json", "-n", "2").stdout)["rtt_ms"]
    assert len(rtts) == 2 and all(t > 0 for t in rtts)


def test_status_table(server):
    zeo(server.text, "loadBefore", "0", "max")  # at least one load counted
    lines = zeo(server.text, "status").stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["storage", "connections", "loads"]
    row = dict(zip(header, lines[1].split()))
    assert row["storage"] == "1" and int(row["loads"]) >= 1
    assert row["last-transaction"] == server.tids["second"].hex()
    assert lines[2].startswith("serving since ")
    raw = json.loads(zeo(server.text, "status", "--json").stdout)
    assert set(raw) == {"1"} and raw["1"]["commits"] == 0


def test_errors_and_exit_codes(server, tmp_path):
    r = zeo(server.text, "loadBefore", "99", "max", check_status=1)
    assert r.stderr == f"zeo: server error: ZODB.POSException.POSKeyError: {99:016x}\n"
    r = zeo(server.text, "nosuch", check_status=2)
    assert "unknown method 'nosuch'" in r.stderr
    r = zeo(server.text, "tpc_begin", "1", check_status=2)
    assert "not callable" in r.stderr
    r = zeo(server.text, "loadBefore", "xyz", "max", check_status=2)
    assert "bad oid 'xyz'" in r.stderr
    r = zeo(server.text, "loadBefore", check_status=2)
    assert "missing oid, tid" in r.stderr
    r = zeo(server.text, "--json", "getTid", "{", check_status=2)
    assert "not JSON" in r.stderr
    r = zeo(server.text, "-s", "nope", "ping", check_status=1)
    assert "unknown storage: nope" in r.stderr
    r = zeo(str(tmp_path / "no.sock"), "ping", check_status=3)
    assert r.stderr.startswith(f"zeo: cannot talk to {tmp_path / 'no.sock'}")


def test_msgpack_answer(tmp_path):
    """A client may answer a Z5 server in msgpack (zeo-facts §1.2): our server must follow."""
    tids = make_data(tmp_path / "Data.fs")
    with start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs")) as srv:
        text = f"{srv.addr[0]}:{srv.addr[1]}"
        r = zeo(text, "--protocol", "M", "ping", "-n", "1")
        assert "(M5)" in r.stdout
        assert zeo(text, "--protocol", "M", "lastTransaction").stdout == tids["second"].hex() + "\n"


@pytest.mark.parametrize("kind", ["ours", "ref"])
def test_msgpack_server_and_second_storage(kind, tmp_path):
    tids = make_data(tmp_path / "a.fs")
    storages = filestorage_conf(tmp_path / "a.fs", "main") + "\n" + filestorage_conf(
        tmp_path / "b.fs", "other")
    with start_server(kind, tmp_path, storages, "  msgpack true") as srv:
        text = f"{srv.addr[0]}:{srv.addr[1]}"
        assert zeo(text).stdout.startswith(
            f"ZEO server at {text}: protocol M5, storages: main, other\n")
        assert zeo(text, "-s", "main", "lastTransaction").stdout == tids["second"].hex() + "\n"
        assert zeo(text, "-s", "other", "lastTransaction").stdout == z64.hex() + "\n"
        rows = zeo(text, "status").stdout.splitlines()[1:3]
        assert [r.split()[0] for r in rows] == ["main", "other"]
        assert rows[0].split()[-1] == tids["second"].hex()
        r = zeo(text, "lastTransaction", check_status=1)  # there is no storage "1"
        assert "unknown storage: 1" in r.stderr


@pytest.mark.parametrize("kind", ["ours", "ref"])
def test_pack_over_unix_socket(kind, tmp_path):
    tids = make_data(tmp_path / "Data.fs")
    sock = str(tmp_path / "zeo.sock")
    with start_server(kind, tmp_path, filestorage_conf(tmp_path / "Data.fs"), addr=sock):
        # Before the pack, the first revision of the root is still there.
        zeo(sock, "loadSerial", "0", tids["first"].hex())
        r = zeo(sock, "pack", "now")
        assert r.stdout == f"packed storage 1 at {sock}\n"
        assert r.stderr == ""  # no progress indicator without a terminal
        r = zeo(sock, "loadSerial", "0", tids["first"].hex(), check_status=1)
        assert "POSKeyError" in r.stderr
        assert zeo(sock, "lastTransaction").stdout == tids["second"].hex() + "\n"


def test_pack_progress_on_a_terminal(tmp_path):
    make_data(tmp_path / "Data.fs")
    with start_server("ours", tmp_path, filestorage_conf(tmp_path / "Data.fs")) as srv:
        text = f"{srv.addr[0]}:{srv.addr[1]}"
        master, slave = pty.openpty()
        try:
            r = zeo(text, "pack", stderr=slave)
            os.close(slave)
            slave = -1
            seen = b""
            while select.select([master], [], [], 2)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the terminal's other side is closed
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        assert r.stdout == f"packed storage 1 at {text}\n"
        assert b"packing storage 1 done in " in seen


def test_format_value_shapes():
    assert format_value(z64) == "0000000000000000"
    assert format_value(b"x" * 100, max_bytes=4) == "78787878… (100 bytes)"
    assert format_value({"a": [1, 2], "b": {"c": b"\x01"}}) == "a: [1, 2]\nb:\n  c: 01"
    assert format_value([{"x": 1, "y": 2}]) == "- x: 1\n  y: 2"
