"""`--health-port`: /healthz (200 while ticks run on time) and /metrics (Prometheus text).

Counters come from what this daemon did; the per-audience gauges (members, pending and failed
deliveries, last success) are read from the state store at scrape time, so every daemon sharing
a store reports the same truth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from wsgiref.types import WSGIApplication

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from audience_sync.config import Config
from audience_sync.drain import DrainReport
from audience_sync.errors import AudienceSyncError
from audience_sync.runner import RunResult
from audience_sync.scheduler import Observer
from audience_sync.state import queries
from audience_sync.state.store import Store
from audience_sync.states import RunStatus
from audience_sync.ui.server import run_wsgi

log = logging.getLogger("audience_sync.health")

# A tick (or progress inside a long one) must have been seen within this many tick intervals.
LATE_TICKS = 3
# ...and never less than this: a single large run reports no progress while it commits.
MIN_HEALTH_WINDOW = timedelta(seconds=60)


class Metrics(Observer):
    """The daemon's observer: Prometheus metrics plus the heartbeat /healthz reads."""

    def __init__(self, store: Store, config: Config, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        self.window = max(config.schedule.tick * LATE_TICKS, MIN_HEALTH_WINDOW).total_seconds()
        self._monotonic = monotonic
        self._heartbeat = monotonic()
        self.ticks = Counter("audience_sync_ticks", "Scheduler ticks, by outcome.", ["outcome"],
                             registry=self.registry)
        self.last_tick = Gauge("audience_sync_last_tick_timestamp_seconds",
                               "When the last tick finished (Unix time).", registry=self.registry)
        self.runs = Counter("audience_sync_runs", "Runs, by audience, kind and status.",
                            ["audience", "kind", "status"], registry=self.registry)
        self.changes = Counter("audience_sync_changes", "Membership changes applied by runs.",
                               ["audience", "change"], registry=self.registry)
        self.run_seconds = Counter("audience_sync_run_seconds", "Time spent in runs.",
                                   ["audience"], registry=self.registry)
        self.sent = Counter("audience_sync_deliveries_sent", "Deliveries acknowledged.",
                            ["destination"], registry=self.registry)
        self.failed = Counter("audience_sync_deliveries_failed",
                              "Deliveries failed for good (until retried).", ["destination"],
                              registry=self.registry)
        self.registry.register(StoreCollector(store, config))

    # -- Observer ------------------------------------------------------------------------------

    def tick_started(self) -> None:
        self.progress()

    def tick_finished(self, ok: bool) -> None:
        self.ticks.labels("ok" if ok else "failed").inc()
        if ok:
            self.progress()
            self.last_tick.set_to_current_time()

    def progress(self) -> None:
        self._heartbeat = self._monotonic()

    def run_finished(self, result: RunResult) -> None:
        self.runs.labels(result.key, result.kind, result.status).inc()
        self.run_seconds.labels(result.key).inc(result.seconds)
        if result.status == RunStatus.SUCCEEDED:
            for change, count in (("entered", result.entered), ("exited", result.exited),
                                  ("changed", result.changed)):
                self.changes.labels(result.key, change).inc(count)

    def drained(self, report: DrainReport) -> None:
        for name, dest in report.destinations.items():
            self.sent.labels(name).inc(dest.sent)
            self.failed.labels(name).inc(dest.failed)

    # -- health --------------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        age = self._monotonic() - self._heartbeat
        if age <= self.window:
            return True, f"ok: last tick activity {age:.1f}s ago"
        return False, f"late: no tick activity for {age:.1f}s (limit {self.window:.0f}s)"

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class StoreCollector(Collector):
    """Per-audience gauges read from the state store at scrape time."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.keys = {c.key for c in config.computations}

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("audience_sync_state_db_up",
                               "1 when the state database answered this scrape.")
        try:
            members, success, deliveries = self._read()
        except AudienceSyncError as exc:
            log.warning("metrics: %s", exc.message)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield members
        yield success
        yield deliveries

    def _read(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        members = GaugeMetricFamily("audience_sync_members", "Current members (or users with "
                                    "a trait value).", labels=["audience"])
        success = GaugeMetricFamily("audience_sync_last_success_timestamp_seconds",
                                    "When the last successful run finished (Unix time).",
                                    labels=["audience"])
        deliveries = GaugeMetricFamily("audience_sync_deliveries",
                                       "Deliveries not yet acknowledged, by status.",
                                       labels=["audience", "destination", "status"])
        keys: dict[int, str] = {}
        for row in self.store.computations():
            if row.key not in self.keys:
                continue
            keys[row.id] = row.key
            members.add_metric([row.key], row.member_count)
            if row.last_success_at is not None:
                success.add_metric([row.key], row.last_success_at.timestamp())
        counts = queries.delivery_counts(self.store)
        for (cid, destination, status), count in sorted(counts.items()):
            if cid in keys:
                deliveries.add_metric([keys[cid], destination, status], count)
        return members, success, deliveries


class HealthServer:
    """A small threaded HTTP server for probes and scrapes, and the dashboard (`ui`) beside
    them when given."""

    def __init__(self, metrics: Metrics, host: str, port: int,
                 ui: WSGIApplication | None = None) -> None:
        handler = _handler(metrics, ui)
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="health",
                                        daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(metrics: Metrics, ui: WSGIApplication | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, text = metrics.healthy()
                self._reply(200 if ok else 503, "text/plain; charset=utf-8",
                            (text + "\n").encode())
            elif path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, metrics.exposition())
            else:
                self.do_POST()

        def do_POST(self) -> None:
            if ui is not None:
                run_wsgi(self, ui)  # the dashboard checks its own token
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    return Handler
