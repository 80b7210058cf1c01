"""A persistent client cache survives a client restart: after reconnecting, only the objects
changed meanwhile are loaded from the server (counted with ``server_status()['loads']``)."""

from __future__ import annotations

import pytest
from persistent.mapping import PersistentMapping

import ZEO
from support.servers import filestorage_conf, start_server
from ZEO.client.storage import ClientStorage

pytestmark = pytest.mark.timeout(60)

OBJECTS = 50
CHANGED = 5


def _loads(addr) -> int:
    """The server's load count, asked by a client that loads nothing itself."""
    probe = ClientStorage(addr)
    try:
        return probe.server_status()["loads"]
    finally:
        probe.close()


def _read_all(db) -> list:
    with db.transaction() as conn:
        root = conn.root()
        return [root[f"o{i}"]["v"] for i in range(OBJECTS)]


@pytest.mark.parametrize("restart_server", [False, True])
def test_restart_reloads_only_changed_objects(tmp_path, restart_server):
    conf = filestorage_conf(tmp_path / "Data.fs")
    srv = start_server("ours", tmp_path / "srv", conf)
    try:
        db = ZEO.DB(srv.addr)
        with db.transaction() as conn:
            for i in range(OBJECTS):
                conn.root()[f"o{i}"] = PersistentMapping(v=0)
        db.close()

        cache = str(tmp_path / "client.zec")
        cold_before = _loads(srv.addr)
        db = ZEO.DB(srv.addr, cache=cache)
        assert _read_all(db) == [0] * OBJECTS
        db.close()
        cold = _loads(srv.addr) - cold_before  # the client "restarts": only its cache file stays

        other = ZEO.DB(srv.addr)
        with other.transaction() as conn:
            for i in range(CHANGED):
                conn.root()[f"o{i}"]["v"] = 1
        other.close()
        if restart_server:
            srv.stop()
            srv = start_server("ours", tmp_path / "srv", conf, addr=srv.addr)

        before = _loads(srv.addr)
        # Without read-ahead: it would fetch (and count) oids past the last one here.
        db = ZEO.DB(srv.addr, cache=cache, read_ahead=0)
        try:
            values = _read_all(db)
        finally:
            db.close()
        warm = _loads(srv.addr) - before
        assert values == [1] * CHANGED + [0] * (OBJECTS - CHANGED)
        print(f"loads: cold {cold}, after reconnect {warm} ({CHANGED} objects changed)")
        assert cold >= OBJECTS + 1  # every object and the root
        # Only the changed objects are loaded again; the root and the others come from the
        # cache file, verified with getInvalidations (or, after a server restart, from the
        # invalidation queue the server seeds from the FileStorage).
        assert warm == CHANGED, warm
    finally:
        srv.stop()
