"""An optional Prometheus endpoint (needs ``prometheus_client``, the ``metrics`` extra).

:class:`MetricsExporter` serves ``/metrics`` over HTTP from its own thread with its own
registry.  Counters and gauges are read from the server on each scrape, on the server's loop
(so the loop's data is never read mid-change); the commit-lock histograms are fed by the
server's ``observer`` hook (``lock_released(storage_id, wait_s, hold_s)``).

Metrics (label ``storage`` where per storage): ``zeo_loads_total``, ``zeo_stores_total``,
``zeo_commits_total``, ``zeo_aborts_total``, ``zeo_conflicts_total``,
``zeo_conflicts_resolved_total``, ``zeo_connections`` (per storage), ``zeo_server_connections``,
``zeo_connections_opened_total``, ``zeo_active_transactions``, ``zeo_commit_lock_waiting``,
``zeo_invalidation_queue_length``, ``zeo_received_bytes_total``, ``zeo_sent_bytes_total``,
``zeo_commit_lock_wait_seconds`` and ``zeo_commit_lock_hold_seconds`` (histograms),
``zeo_last_transaction_timestamp_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .storage_server import StorageServer

logger = logging.getLogger("ZEO.server.metrics")

#: Commit-lock wait and hold buckets, in seconds: from sub-millisecond commits to stalls.
LOCK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0)
SCRAPE_TIMEOUT = 10.0

_COUNTERS = (
    ("loads", "zeo_loads", "Objects loaded (loadBefore calls)."),
    ("stores", "zeo_stores", "Objects stored, restored or deleted."),
    ("commits", "zeo_commits", "Transactions committed."),
    ("aborts", "zeo_aborts", "Transactions aborted."),
    ("conflicts", "zeo_conflicts", "Write conflicts reported to clients."),
    ("conflicts_resolved", "zeo_conflicts_resolved", "Conflicts resolved on the server."),
)
_GAUGES = (
    ("connections", "zeo_connections", "Connections registered on the storage."),
    ("active_txns", "zeo_active_transactions", "Transactions in progress."),
    ("waiting", "zeo_commit_lock_waiting", "Transactions waiting for the commit lock."),
    ("invalidation_queue_length", "zeo_invalidation_queue_length",
     "Transactions in the invalidation queue."),
)


_RELAY_COUNTERS = (
    ("polls", "zeo_relay_polls", "Looks at the database for other servers' commits."),
    ("notifications", "zeo_relay_notifications",
     "NOTIFY wake-ups from other servers' commits."),
    ("relayed", "zeo_relay_commits", "Other servers' commits sent to this server's clients."),
    ("errors", "zeo_relay_errors", "Failed looks at the database."),
)


def _relay_metrics(relays: dict[str, dict]) -> Iterator[Metric]:
    """The relay of each MVCC storage (ZEO.server.relay)."""
    for key, name, doc in _RELAY_COUNTERS:
        family = CounterMetricFamily(name, doc, labels=["storage"])
        for sid, r in relays.items():
            family.add_metric([sid], r.get(key, 0))
        yield family
    lag = GaugeMetricFamily("zeo_relay_lag_seconds",
                            "How far the published tid is behind the newest commit seen in "
                            "the database, in seconds of tid time.", labels=["storage"])
    lag_tids = GaugeMetricFamily("zeo_relay_lag_transactions",
                                 "Commits seen in the database and not yet sent to clients.",
                                 labels=["storage"])
    for sid, r in relays.items():
        lag.add_metric([sid], r.get("lag_seconds", 0.0))
        lag_tids.add_metric([sid], r.get("lag_transactions", 0))
    yield lag
    yield lag_tids


class _ServerCollector:
    def __init__(self, server: StorageServer) -> None:
        self.server = server

    def _statistics(self) -> dict | None:
        server = self.server
        loop = server.event_loop
        if loop.is_closed():
            return None
        if not loop.is_running():
            return server.statistics()

        async def read() -> dict:
            return server.statistics()

        fut = asyncio.run_coroutine_threadsafe(read(), loop)
        try:
            return fut.result(SCRAPE_TIMEOUT)
        except Exception:
            logger.warning("metrics: could not read the server's statistics", exc_info=True)
            fut.cancel()
            return None

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        if stats is None:
            return
        storages = stats["storages"]
        for key, name, doc in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["storage"])
            for sid, st in storages.items():
                family.add_metric([sid], st.get(key, 0))
            yield family
        for key, name, doc in _GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["storage"])
            for sid, st in storages.items():
                gauge.add_metric([sid], st.get(key, 0))
            yield gauge
        last = GaugeMetricFamily("zeo_last_transaction_timestamp_seconds",
                                 "Time of the storage's last committed transaction.",
                                 labels=["storage"])
        for sid, st in storages.items():
            last.add_metric([sid], _tid_seconds(st.get("last-transaction")))
        yield last
        relays = {sid: st["relay"] for sid, st in storages.items() if st.get("relay")}
        if relays:
            yield from _relay_metrics(relays)
        yield GaugeMetricFamily("zeo_server_connections", "Open client connections.",
                                value=stats["connections"])
        yield CounterMetricFamily("zeo_connections_opened", "Client connections accepted.",
                                  value=stats["connections_total"])
        yield CounterMetricFamily("zeo_received_bytes", "Bytes received from clients.",
                                  value=stats["bytes_in"])
        yield CounterMetricFamily("zeo_sent_bytes", "Bytes sent to clients.",
                                  value=stats["bytes_out"])


def _tid_seconds(hex_tid: Any) -> float:
    if not hex_tid or set(hex_tid) == {"0"}:
        return 0.0
    from persistent.TimeStamp import TimeStamp

    return TimeStamp(bytes.fromhex(hex_tid)).timeTime()


class MetricsExporter:
    """Serve ``server``'s metrics at ``http://host:port/metrics``; port 0 picks a free one.

    Installs itself as ``server.observer``.  ``address`` is the bound ``(host, port)``.
    """

    def __init__(self, server: StorageServer, address: tuple[str, int]) -> None:
        self.server = server
        self.registry = CollectorRegistry()
        self.registry.register(_ServerCollector(server))
        self.lock_wait = Histogram(
            "zeo_commit_lock_wait_seconds", "Time votes waited for the commit lock.",
            ["storage"], registry=self.registry, buckets=LOCK_BUCKETS)
        self.lock_hold = Histogram(
            "zeo_commit_lock_hold_seconds", "Time transactions held the commit lock.",
            ["storage"], registry=self.registry, buckets=LOCK_BUCKETS)
        for sid in server.states:  # export zero histograms before the first commit
            self.lock_wait.labels(sid)
            self.lock_hold.labels(sid)
        ProcessCollector(registry=self.registry)  # process_* (CPU, memory, descriptors)
        PlatformCollector(registry=self.registry)
        host, port = address
        host = host or "127.0.0.1"  # a bare port: this machine only, never every interface
        self._httpd = _http_server(host, port, _only_metrics(make_wsgi_app(self.registry)))
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="zeo-metrics", daemon=True)
        self._thread.start()
        self.address = (host, self._httpd.server_address[1])
        server.observer = self
        logger.info("metrics at http://%s:%d/metrics", *self.address)

    def lock_released(self, storage_id: str, wait_s: float, hold_s: float) -> None:
        """Observer hook, called by the server each time a commit lock is released."""
        self.lock_wait.labels(storage_id).observe(max(wait_s, 0.0))
        self.lock_hold.labels(storage_id).observe(max(hold_s, 0.0))

    def close(self) -> None:
        """Stop the HTTP server (from any thread but the loop's, or without blocking it)."""
        if self.server.observer is self:
            self.server.observer = None
        httpd = self._httpd

        def stop() -> None:
            httpd.shutdown()
            httpd.server_close()

        # shutdown() waits for serve_forever to return: do it off the caller's thread.
        threading.Thread(target=stop, name="zeo-metrics-stop", daemon=True).start()


class _QuietHandler(WSGIRequestHandler):
    #: Seconds an idle connection may hold one of the few serving threads.
    timeout = 2

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedThreadingServer(WSGIServer):
    """Serves each request in a thread, at most ``max_threads`` at once: prometheus_client's
    own server starts a thread for every connection, with no limit.  When all are busy the
    accept loop waits."""

    max_threads = 4
    request_queue_size = 64
    daemon_threads = True

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_threads)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._slots.acquire()
        threading.Thread(target=self._serve, args=(request, client_address),
                         name="zeo-metrics-request", daemon=True).start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics: error serving %s", client_address, exc_info=True)


def _http_server(host: str, port: int, app: Any) -> WSGIServer:
    """An HTTP server for ``app`` on ``host:port`` with a bounded number of threads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (_BoundedThreadingServer,), {"address_family": family})
    return make_server(host, port, app, server_class, handler_class=_QuietHandler)


def _only_metrics(app: Any) -> Any:
    """``app`` at ``/metrics`` (and ``/``); 404 elsewhere."""
    def route(environ: dict, start_response: Any) -> Any:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        return app(environ, start_response)

    return route
