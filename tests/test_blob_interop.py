"""Blobs between zeo-ng and ZEO 6.2: our client on their server, their client on ours (both
modes), one ``zeocache`` directory used by both clients, and the shared-mode name check."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import transaction
import ZODB
import ZODB.blob
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

from support.refzeo import run_ref
from support.servers import filestorage_conf, start_server
from ZEO.ClientStorage import ClientStorage
from ZEO.Exceptions import ClientDisconnected

PAYLOAD = b"interop blob " * 20000  # 260 KB: several 59000-byte chunks


@pytest.fixture(params=["ours", "ref"])
def kind(request) -> str:
    return request.param


def _server(kind: str, tmp_path: Path):
    return start_server(kind, tmp_path / f"{kind}-server",
                        filestorage_conf(tmp_path / "Data.fs", blob_dir=tmp_path / "server-blobs"))


@pytest.mark.parametrize("shared", [False, True], ids=["streamed", "shared"])
def test_our_client_on_both_servers(kind: str, shared: bool, tmp_path: Path) -> None:
    server = _server(kind, tmp_path)
    try:
        def blob_dir(name: str) -> str:
            return str(tmp_path / "server-blobs") if shared else str(tmp_path / name)

        db = ZODB.DB(ClientStorage(server.addr, blob_dir=blob_dir("up"), shared_blob_dir=shared))
        try:
            conn = db.open()
            conn.root.blob = ZODB.blob.Blob(PAYLOAD)
            transaction.commit()
        finally:
            db.close()
        storage = ClientStorage(server.addr, blob_dir=blob_dir("down"), shared_blob_dir=shared)
        db = ZODB.DB(storage)
        try:
            conn = db.open()
            with conn.root.blob.open() as f:
                assert f.read() == PAYLOAD
            if not shared:
                assert storage._blobs.downloads == 1
        finally:
            db.close()
    finally:
        server.stop()


REF_CLIENT = textwrap.dedent(r"""
    import json, os, sys, transaction, ZODB, ZODB.blob
    from ZEO.ClientStorage import ClientStorage
    host, port, up_dir, down_dir, shared = sys.argv[1:]
    shared = shared == "1"
    payload = b"interop blob " * 20000
    db = ZODB.DB(ClientStorage((host, int(port)), blob_dir=up_dir, shared_blob_dir=shared))
    conn = db.open()
    conn.root.ref_blob = ZODB.blob.Blob(payload)
    transaction.commit()
    db.close()
    storage = ClientStorage((host, int(port)), blob_dir=down_dir, shared_blob_dir=shared)
    db = ZODB.DB(storage)
    conn = db.open()
    with conn.root.ref_blob.open() as f:
        same = f.read() == payload
    extra = None
    if "blob" in conn.root():
        with conn.root.blob.open() as f:
            extra = len(f.read())
    path = storage.loadBlob(conn.root.ref_blob._p_oid, conn.root.ref_blob._p_serial)
    db.close()
    print(json.dumps({"same": same, "path": path, "extra": extra}))
""")


@pytest.mark.parametrize("shared", [False, True], ids=["streamed", "shared"])
def test_zeo62_client_on_our_server(shared: bool, tmp_path: Path) -> None:
    server = _server("ours", tmp_path)
    try:
        host, port = server.addr
        up = str(tmp_path / "server-blobs") if shared else str(tmp_path / "ref-up")
        down = str(tmp_path / "server-blobs") if shared else str(tmp_path / "ref-down")
        out = run_ref(REF_CLIENT, host, str(port), up, down, "1" if shared else "0")
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["same"]
        assert report["path"].startswith(down)
    finally:
        server.stop()


def test_one_cache_directory_for_zeo62_and_our_client(tmp_path: Path) -> None:
    """Same ``zeocache`` layout: a blob ZEO 6.2 downloaded is a cache hit for us, and back."""
    server = _server("ours", tmp_path)
    cache = tmp_path / "common-cache"
    try:
        host, port = server.addr
        db = ZODB.DB(ClientStorage(server.addr, blob_dir=str(tmp_path / "ours-up")))
        try:
            conn = db.open()
            conn.root.blob = ZODB.blob.Blob(PAYLOAD)
            transaction.commit()
        finally:
            db.close()
        # ZEO 6.2 commits ref_blob and downloads both blobs into the common cache...
        out = run_ref(REF_CLIENT, host, str(port), str(tmp_path / "ref-up"), str(cache), "0")
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["same"] and report["extra"] == len(PAYLOAD)
        # ...where our client finds them without asking the server.
        storage = ClientStorage(server.addr, blob_dir=str(cache))
        db = ZODB.DB(storage)
        try:
            conn = db.open()
            with conn.root.blob.open() as f:
                assert f.read() == PAYLOAD
            with conn.root.ref_blob.open() as f:
                assert f.read() == PAYLOAD
            assert storage._blobs.downloads == 0
        finally:
            db.close()
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["../../evil.tmp", "/etc/evil.tmp", "blob.txt", ".."])
def test_shared_store_refuses_names_outside_the_oid_directory(kind: str, name: str,
                                                               tmp_path: Path) -> None:
    server = _server(kind, tmp_path)
    storage = ClientStorage(server.addr, blob_dir=str(tmp_path / "server-blobs"),
                            shared_blob_dir=True)
    try:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        oid = storage.new_oid()
        storage._txn_conn.call_oneway("storea", oid, z64, b"record", id(txn))
        storage._txn_conn.call_oneway("storeBlobShared", oid, z64, b"record", name, id(txn))
        with pytest.raises(ClientDisconnected):
            storage.tpc_vote(txn)  # the server dropped the connection instead
        storage.tpc_abort(txn)
    finally:
        storage.close()
        server.stop()
