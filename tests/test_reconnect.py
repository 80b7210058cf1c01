"""Reconnection: parallel addresses, quiet retries, clear errors, read-only fallback upgrade,
``new_addr`` and cache verification (zeo-facts §3) against real server processes."""

from __future__ import annotations

import logging
import shutil
import socket
import time

import pytest
import ZODB
import ZODB.event

import ZEO
from support.proxy import FaultProxy
from support.servers import filestorage_conf, start_server
from support.waiting import wait_until
from ZEO.client.storage import ClientStorage
from ZEO.Exceptions import ClientDisconnected
from ZEO.interfaces import StaleCache

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server(server_process):
    return server_process


@pytest.fixture
def silent_addr():
    """A TCP address that accepts connections and never says anything."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()
    sock.close()


def test_addresses_are_tried_in_parallel(server, silent_addr):
    # The silent address would hold a sequential attempt for CONNECT_TIMEOUT (10 s), longer
    # than the 5 s we wait: only a parallel attempt connects.
    storage = ClientStorage([silent_addr, server.addr], wait_timeout=5)
    try:
        assert storage.is_connected()
        assert tuple(storage._server_addr) == tuple(server.addr)
    finally:
        storage.close()


def test_no_connection_error_names_address_and_cause(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    addr = sock.getsockname()
    sock.close()  # nothing listens there now
    with pytest.raises(ClientDisconnected) as info:
        ClientStorage(addr, wait_timeout=1)
    message = str(info.value)
    assert repr(tuple(addr)) in message and "ConnectionRefusedError" in message, message


def test_failing_registration_is_logged_once_not_per_attempt(server, caplog):
    caplog.set_level(logging.DEBUG, logger="ZEO")
    storage = ClientStorage(server.addr, storage="no-such-storage", wait=False)
    try:
        # Several attempts happen (fast first retry, then backoff).
        time.sleep(1.5)
        assert not storage.is_connected()
    finally:
        storage.close()
    failures = [r for r in caplog.records if "no-such-storage" in r.getMessage()
                or "unknown storage" in r.getMessage()]
    loud = [r for r in failures if r.levelno >= logging.INFO]
    assert len(failures) >= 2, [r.getMessage() for r in failures]  # it did retry
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert sum(1 for r in caplog.records if r.exc_info) <= 1


def test_reconnects_after_restart_and_new_addr(tmp_path):
    conf = filestorage_conf(tmp_path / "Data.fs")
    a = start_server("ours", tmp_path / "a", conf)
    db = ZEO.DB(a.addr, wait_timeout=10)
    try:
        with db.transaction() as conn:
            conn.root()["x"] = 1
        a.stop()
        assert wait_until(lambda: not db.storage.is_connected())
        # The same data, served at another address: new_addr points the client there.
        b = start_server("ours", tmp_path / "b", conf)
        try:
            db.storage.new_addr(b.addr)
            assert wait_until(db.storage.is_connected)
            with db.transaction() as conn:
                assert conn.root()["x"] == 1
                conn.root()["x"] = 2
        finally:
            db.close()
            b.stop()
    finally:
        a.stop()


def test_read_only_fallback_upgrades_when_a_writable_server_comes_back(tmp_path):
    data = tmp_path / "Data.fs"
    rw = start_server("ours", tmp_path / "rw", filestorage_conf(data))
    db = ZEO.DB(rw.addr)
    with db.transaction() as conn:
        conn.root()["x"] = 1
    db.close()
    rw.stop()
    copy = tmp_path / "copy.fs"
    shutil.copy(data, copy)
    ro = start_server("ours", tmp_path / "ro", filestorage_conf(copy), zeo_extra="read-only true")
    rw = start_server("ours", tmp_path / "rw", filestorage_conf(data), addr=rw.addr)
    proxy = FaultProxy(rw.addr)
    proxy.refuse()  # the writable server is unreachable at first
    try:
        storage = ClientStorage([ro.addr, proxy.addr], read_only_fallback=True, wait_timeout=10)
        db = ZODB.DB(storage)
        try:
            assert storage.isReadOnly()
            with db.transaction() as conn:
                assert conn.root()["x"] == 1
            proxy.refuse(False)
            assert wait_until(lambda: not storage.isReadOnly())
            assert tuple(storage._server_addr) == tuple(proxy.addr)
            with db.transaction() as conn:
                conn.root()["x"] = 2
        finally:
            db.close()
        db = ZEO.DB(rw.addr)
        with db.transaction() as conn:
            assert conn.root()["x"] == 2
        db.close()
    finally:
        proxy.close()
        ro.stop()
        rw.stop()


def test_read_only_without_fallback_never_connects(tmp_path):
    ro = start_server("ours", tmp_path / "ro", filestorage_conf(tmp_path / "Data.fs"),
                      zeo_extra="read-only true")
    try:
        with pytest.raises(ClientDisconnected, match="read-only"):
            ClientStorage(ro.addr, wait_timeout=1)
        storage = ClientStorage(ro.addr, read_only=True, wait_timeout=5)
        assert storage.isReadOnly()
        storage.close()
    finally:
        ro.stop()


def _fill(addr, n: int) -> None:
    db = ZEO.DB(addr)
    for i in range(n):
        with db.transaction() as conn:
            conn.root()[f"k{i % 3}"] = i
    db.close()


def test_gap_beyond_invalidation_queue_drops_cache_and_publishes_stale_cache(tmp_path,
                                                                           monkeypatch):
    conf = filestorage_conf(tmp_path / "Data.fs")
    srv = start_server("ours", tmp_path / "srv", conf, zeo_extra="invalidation-queue-size 2")
    cache = str(tmp_path / "client.zec")
    events: list = []

    def subscriber(event) -> None:
        if isinstance(event, StaleCache):
            events.append(event)

    # ZODB.event.notify is zope.event's when installed, else a no-op: record it either way.
    monkeypatch.setattr(ZODB.event, "notify", subscriber)
    try:
        db = ZEO.DB(srv.addr, cache=cache)
        with db.transaction() as conn:
            conn.root()["k0"] = "old"
        db.close()
        _fill(srv.addr, 6)  # more transactions than the queue holds
        storage = ClientStorage(srv.addr, cache=cache)
        db = ZODB.DB(storage)
        try:
            assert [e.storage for e in events] == [storage]
            with db.transaction() as conn:
                assert conn.root()["k0"] == 3  # not the stale "old"
        finally:
            db.close()
    finally:
        srv.stop()


def test_cache_newer_than_server_is_refused_with_critical(tmp_path, caplog):
    data = tmp_path / "Data.fs"
    conf = filestorage_conf(data)
    srv = start_server("ours", tmp_path / "srv", conf)
    _fill(srv.addr, 1)
    srv.stop()
    old = tmp_path / "old.fs"
    shutil.copy(data, old)
    srv = start_server("ours", tmp_path / "srv", conf, addr=srv.addr)
    cache = str(tmp_path / "client.zec")
    _fill(srv.addr, 2)
    db = ZEO.DB(srv.addr, cache=cache)
    with db.transaction() as conn:
        conn.root()["k1"]
    db.close()
    srv.stop()
    srv = start_server("ours", tmp_path / "old", filestorage_conf(old))  # older data
    try:
        caplog.set_level(logging.INFO, logger="ZEO")
        with pytest.raises(ClientDisconnected):
            ClientStorage(srv.addr, cache=cache, wait_timeout=1.5)
        critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
        assert critical and "out of sync" in critical[0].getMessage()
    finally:
        srv.stop()
