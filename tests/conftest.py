import os
import sys

import pytest

# Make tests/support importable as ``support`` from every test module.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def make_server(tmp_path):
    """Start in-process StorageServers (own loop thread, real sockets); closed after the test.

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
