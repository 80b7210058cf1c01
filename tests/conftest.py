import os
import sys

import pytest

# Make tests/support importable as ``support`` from every test module.
sys.path.insert(0, os.path.dirname(__file__))


# The server fixtures, one family:
#   make_server            in-process StorageServers (own loop thread, real sockets)
#   make_server_process    runzeo processes, ours or the reference ZEO's
#   server_process         one runzeo process of ours on a FileStorage
# Modules that need a server of another shape (module scope, parametrized by kind) build it
# with tests/support/servers.py's start_server and stop it themselves.


@pytest.fixture
def make_server(tmp_path):
    """Start in-process StorageServers; closed after the test.

    ``make_server(addr=..., storages=..., **StorageServer options)``; the default storage is a
    FileStorage named ``"1"`` in ``tmp_path``.
    """
    from ZODB.FileStorage import FileStorage

    from ZEO.server import StorageServer

    servers = []

    def make(addr=("127.0.0.1", 0), storages=None, **kw):
        if storages is None:
            storages = {"1": FileStorage(str(tmp_path / "Data.fs"))}
        server = StorageServer(addr, storages, **kw)
        server.start_thread()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def make_server_process(tmp_path):
    """Start ``runzeo`` processes; stopped after the test.

    ``make_server_process(kind="ours", zeo_extra="", name="s", addr=None, storage_conf=None,
    blobs=False, env=None)``: ``kind`` is "ours" or "ref" (ZEO 6.2); the default storage is a
    FileStorage ``tmp_path/<name>.fs`` (with a blob directory when ``blobs``).  The server's
    files are in ``tmp_path/<name>``.
    """
    from support.servers import filestorage_conf, start_server

    servers = []

    def make(kind="ours", zeo_extra="", name="s", addr=None, storage_conf=None, blobs=False,
             env=None):
        if storage_conf is None:
            storage_conf = filestorage_conf(tmp_path / f"{name}.fs",
                                            blob_dir=tmp_path / f"{name}-blobs" if blobs else None)
        srv = start_server(kind, tmp_path / name, storage_conf, zeo_extra, addr=addr, env=env)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def server_process(make_server_process):
    """One ``runzeo`` process of ours serving a FileStorage named "1"."""
    return make_server_process()


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL cluster for this test process (tests/support/postgres.py).

    Skipped with the reason when PostgreSQL or RelStorage is missing, except under CI
    (``CI=true``), where ``tools/test.sh`` installs both: there it fails.
    """
    from support import postgres as pg

    if pg.MISSING_REASON is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests cannot run under CI: {pg.MISSING_REASON}")
        pytest.skip(pg.MISSING_REASON)
    return pg.shared_cluster()


@pytest.fixture
def relstorage_conf(postgres):
    """``relstorage_conf(name="1", blobs=None, extra="")``: a ``<relstorage>`` section over a
    new database (history-preserving), and the ``%import`` it needs."""

    from support.postgres import relstorage_section

    def make(name="1", blob_dir=None, shared_blob_dir=True, extra=""):
        return relstorage_section(postgres.create_database(), name, blob_dir,
                                  shared_blob_dir, extra)

    return make


@pytest.fixture
def closing():
    """Register storages/DBs to close at teardown, even when the test fails."""
    things = []

    def add(x):
        things.append(x)
        return x

    yield add
    for x in reversed(things):
        try:
            x.close()
        except Exception:
            pass
