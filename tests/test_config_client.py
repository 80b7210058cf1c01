"""Client config sections open our ClientStorage against a live server: ZEO's
``<clientstorage>`` (after ``%import ZEO``) and ZODB's own ``<zeoclient>``."""

from __future__ import annotations

import pytest
import transaction
import ZODB.config

import ZEO
from ZEO.client.storage import ClientStorage


@pytest.fixture
def server(tmp_path):
    addr, stop = ZEO.server(path=str(tmp_path / "Data.fs"), port=str(tmp_path / "zeo.sock"))
    yield addr
    stop()


def roundtrip(storage) -> None:
    """Commit through a DB on ``storage`` and read the value back; closes the DB."""
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            conn.root()["x"] = conn.root().get("x", 0) + 1
        with db.transaction() as conn:
            assert conn.root.x >= 1
    finally:
        db.close()


def test_clientstorage_section(server, tmp_path):
    storage = ZODB.config.storageFromString(f"""
        %import ZEO
        <clientstorage>
          server {server}
          storage 1
          name configured
          client-label app-1
          cache-size 1MB
          wait-timeout 10
        </clientstorage>
    """)
    assert isinstance(storage, ClientStorage)
    assert storage.getName().startswith("configured")
    assert not storage.isReadOnly()
    roundtrip(storage)


def test_clientstorage_read_only(server):
    # Make sure the root exists first.
    roundtrip(ZEO.client(server))
    storage = ZODB.config.storageFromString(f"""
        %import ZEO
        <clientstorage>
          server {server}
          read-only true
        </clientstorage>
    """)
    try:
        assert isinstance(storage, ClientStorage)
        assert storage.isReadOnly()
        db = ZODB.DB(storage)
        try:
            conn = db.open()
            conn.root.x = 99
            with pytest.raises(ZODB.POSException.ReadOnlyError):
                transaction.commit()
            transaction.abort()
            conn.close()
        finally:
            db.close()
    finally:
        storage.close()


def test_zodb_zeoclient_section(server):
    storage = ZODB.config.storageFromString(f"""
        <zeoclient>
          server {server}
          storage 1
          client-label zodb-section
          read-only-fallback true
        </zeoclient>
    """)
    assert isinstance(storage, ClientStorage)
    roundtrip(storage)


def test_database_config_with_clientstorage(server):
    db = ZODB.config.databaseFromString(f"""
        %import ZEO
        <zodb main>
          cache-size 100
          <clientstorage>
            server {server}
          </clientstorage>
        </zodb>
    """)
    try:
        assert isinstance(db.storage, ClientStorage)
        with db.transaction() as conn:
            conn.root.y = "from a database config"
        with db.transaction() as conn:
            assert conn.root.y == "from a database config"
    finally:
        db.close()
