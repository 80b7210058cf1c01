"""The Prometheus endpoint of a live StorageServer, scraped over HTTP and parsed with
prometheus_client's own text parser."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.utils import p64, z64

from ZEO.server import StorageServer
from ZEO.wire import RemoteError, WireClient

pytestmark = pytest.mark.timeout(60)

MAXTID = p64(2**63 - 1)


@pytest.fixture
def server(make_server):
    return make_server(metrics_address=("127.0.0.1", 0))


def scrape(srv) -> dict:
    """``{(sample name, labels as a sorted tuple): value}`` of one scrape."""
    host, port = srv.metrics.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


ST = (("storage", "1"),)


def commit(c: WireClient, oid: bytes, serial: bytes, data: bytes, txn_id: int = 1) -> bytes:
    c.async_call("tpc_begin", txn_id, b"", b"", {}, None, " ")
    c.async_call("storea", oid, serial, data, txn_id)
    c.call("vote", txn_id)
    return c.call("tpc_finish", txn_id)


def test_counters_gauges_histograms_follow_the_traffic(server):
    before = scrape(server)
    assert before[("zeo_loads_total", ST)] == 0
    assert before[("zeo_commit_lock_hold_seconds_count", ST)] == 0
    assert before[("zeo_server_connections", ())] == 0

    with WireClient(server.addr) as a, WireClient(server.addr) as b:
        a.register("1", False)
        b.register("1", False)
        oid = a.call("new_oids", 1)[0]
        tid = commit(a, oid, z64, b"v1")
        assert b.call("loadBefore", oid, MAXTID)[0] == b"v1"
        # b writes from a stale serial: a conflict, then an abort.
        b.async_call("tpc_begin", 7, b"", b"", {}, None, " ")
        b.async_call("storea", oid, z64, b"stale", 7)
        with pytest.raises(RemoteError) as e:
            b.call("vote", 7)
        assert isinstance(e.value.exception(), ConflictError)
        b.call("tpc_abort", 7)
        # An aborted transaction that never voted.
        a.async_call("tpc_begin", 8, b"", b"", {}, None, " ")
        a.call("tpc_abort", 8)

        m = scrape(server)
        assert m[("zeo_loads_total", ST)] == 1
        assert m[("zeo_stores_total", ST)] == 2
        assert m[("zeo_commits_total", ST)] == 1
        assert m[("zeo_aborts_total", ST)] == 2
        assert m[("zeo_conflicts_total", ST)] == 1
        assert m[("zeo_connections", ST)] == 2
        assert m[("zeo_server_connections", ())] == 2
        assert m[("zeo_connections_opened_total", ())] == 2
        assert m[("zeo_active_transactions", ST)] == 0
        assert m[("zeo_commit_lock_waiting", ST)] == 0
        assert m[("zeo_invalidation_queue_length", ST)] == 2  # the seed entry and our commit
        # Two votes took the lock (the commit and the conflicting one).
        assert m[("zeo_commit_lock_hold_seconds_count", ST)] == 2
        assert m[("zeo_commit_lock_wait_seconds_count", ST)] == 2
        inf_bucket = (("le", "+Inf"), ("storage", "1"))
        assert m[("zeo_commit_lock_hold_seconds_bucket", inf_bucket)] == 2
        assert m[("zeo_commit_lock_hold_seconds_sum", ST)] > 0
        # Each side sent at least its handshake frames and several calls or replies.
        assert m[("zeo_received_bytes_total", ())] > 200
        assert m[("zeo_sent_bytes_total", ())] > 200
        from persistent.TimeStamp import TimeStamp

        assert m[("zeo_last_transaction_timestamp_seconds", ST)] == pytest.approx(
            TimeStamp(tid).timeTime())

    # Closed connections still count their traffic; the gauges drop.
    after = scrape(server)
    assert after[("zeo_received_bytes_total", ())] >= m[("zeo_received_bytes_total", ())]
    for _ in range(100):
        if after[("zeo_server_connections", ())] == 0:
            break
        after = scrape(server)
    assert after[("zeo_server_connections", ())] == 0


def test_endpoint_stops_with_the_server(tmp_path):
    srv = StorageServer(("127.0.0.1", 0), {"1": FileStorage(str(tmp_path / "Data.fs"))},
                        metrics_address=("127.0.0.1", 0))
    thread = srv.start_thread()
    host, port = srv.metrics.address
    assert scrape(srv)[("zeo_commits_total", ST)] == 0
    srv.close()
    thread.join(30)
    import time

    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "metrics endpoint still answers after close()"
        time.sleep(0.05)


def test_bare_port_binds_loopback_few_threads_404_and_process_metrics(tmp_path):
    import socket
    import threading
    import time
    import urllib.error

    srv = StorageServer(("127.0.0.1", 0), {"1": FileStorage(str(tmp_path / "Data.fs"))},
                        metrics_address=("", 0))
    thread = srv.start_thread()
    try:
        host, port = srv.metrics.address
        assert host == "127.0.0.1"  # a bare port never means every interface
        samples = scrape(srv)
        assert any(name.startswith("process_") for name, _ in samples)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{host}:{port}/anything", timeout=10)
        assert e.value.code == 404
        threads = threading.active_count()
        idle = [socket.create_connection((host, port)) for _ in range(50)]
        time.sleep(0.2)
        assert threading.active_count() <= threads + 4  # not a thread per connection
        for s in idle:
            s.close()
        assert scrape(srv)[("zeo_server_connections", ())] == 0  # still answers
    finally:
        srv.close()
        thread.join(30)
