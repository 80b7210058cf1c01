"""ZEO.server(): ad hoc servers in a thread or a child process."""

from __future__ import annotations

import pytest

import ZEO
from support.wire import RemoteError, WireClient, commit_one
from ZEO import _adhoc
from ZEO.wire import ruok


def test_default_threaded_mapping_storage():
    addr, stop = ZEO.server()
    try:
        assert addr[0] == "127.0.0.1" and addr[1] > 0
        with WireClient(addr) as c:
            assert c.greeting == b"Z5"
        assert list(ruok(addr)[1]) == ["1"]
        assert len(commit_one(addr)) == 8
    finally:
        stop()
    with pytest.raises(OSError):
        WireClient(addr, timeout=2)


def test_events_published(monkeypatch):
    import ZODB.event

    seen = []
    monkeypatch.setattr(ZODB.event, "notify", seen.append)
    addr, stop = ZEO.server()
    stop()
    kinds = [type(e).__name__ for e in seen]
    assert "Serving" in kinds and "Closed" in kinds
    serving = next(e for e in seen if type(e).__name__ == "Serving")
    assert serving.address == addr


def test_filestorage_path_and_stop_closes_it(tmp_path):
    path = str(tmp_path / "Data.fs")
    addr, stop = ZEO.server(path=path)
    tid = commit_one(addr)
    stop()
    from ZODB.FileStorage import FileStorage

    fs = FileStorage(path, read_only=True)  # the lock was released by stop()
    try:
        assert fs.lastTransaction() == tid
    finally:
        fs.close()


def test_blob_dir_wraps_in_blobstorage(tmp_path):
    text = _adhoc.build_config(path=str(tmp_path / "Data.fs"), blob_dir=str(tmp_path / "b"))
    assert "<blobstorage 1>" in text and "<filestorage>" in text
    addr, stop = ZEO.server(path=str(tmp_path / "Data.fs"), blob_dir=str(tmp_path / "blobs"))
    try:
        with WireClient(addr) as c:
            c.call("register", "1", False)
            assert c.call("lastTransaction") == b"\0" * 8
        assert (tmp_path / "blobs").is_dir()
    finally:
        stop()


def test_unix_socket_port_and_zeo_conf_dict(tmp_path):
    sock = str(tmp_path / "zeo.sock")
    addr, stop = ZEO.server(port=sock, zeo_conf=dict(read_only=True, msgpack=True))
    try:
        assert addr == sock
        with WireClient(sock) as c:
            assert c.greeting == b"M5"
            with pytest.raises(RemoteError):
                c.call("register", "1", False)
            c.call("register", "1", True)
    finally:
        stop()
    assert not (tmp_path / "zeo.sock").exists()


def test_zeo_conf_string_and_storage_conf():
    storage_conf = "<mappingstorage a/>\n<mappingstorage b/>\n"
    addr, stop = ZEO.server(storage_conf=storage_conf,
                            zeo_conf="<zeo>\n  transaction-timeout 5\n</zeo>")
    try:
        status = ruok(addr)[1]
        assert sorted(status) == ["a", "b"]
        assert status["a"]["timeout-thread-is-alive"] is True
    finally:
        stop()


def test_log_option(tmp_path):
    log = tmp_path / "server.log"
    addr, stop = ZEO.server(zeo_conf=dict(log=str(log), loglevel="INFO"))
    try:
        ruok(addr)[1]
    finally:
        stop()
        import logging

        # The eventlog configured the root logger of this process: undo it.
        root = logging.getLogger()
        for h in list(root.handlers):
            if getattr(h, "baseFilename", None) == str(log):
                root.removeHandler(h)
                h.close()
    assert "serving 1 (MappingStorage" in log.read_text()


def test_child_process(tmp_path):
    path = str(tmp_path / "Data.fs")
    addr, stop = ZEO.server(path=path, threaded=False)
    try:
        assert addr[0] == "127.0.0.1"
        commit_one(addr)
        # The child, not this process, holds the storage.
        import zc.lockfile

        with pytest.raises(zc.lockfile.LockError):
            zc.lockfile.LockFile(path + ".lock")
    finally:
        stop()
    with pytest.raises(OSError):
        WireClient(addr, timeout=2)


def test_child_process_start_failure(tmp_path):
    with pytest.raises(RuntimeError, match="failed to start"):
        ZEO.server(storage_conf="<filestorage 1>\n path /no/such/dir/Data.fs\n</filestorage>",
                   threaded=False)


def test_zeo_server_survives_importing_the_server_package():
    import ZEO.server.storage_server  # noqa: F401  (rebinds the attribute ZEO.server)

    addr, stop = ZEO.server()
    stop()
    from ZEO.StorageServer import StorageServer

    assert ZEO.server.StorageServer is StorageServer


def test_bad_arguments():
    with pytest.raises(TypeError):
        ZEO.server(zeo_conf=dict(no_such_option=1))
    with pytest.raises(TypeError):
        ZEO.server(port=1.5)
