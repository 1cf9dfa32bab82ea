"""/healthz goes 503 when ticks stop; /metrics parses as Prometheus text."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from audience_sync.config import load_config
from audience_sync.health import HealthServer, Metrics
from audience_sync.state.store import Store
from tests.daemon_harness import http_get
from tests.helpers import make_warehouse, write_config


def test_healthz_is_late_without_ticks_and_metrics_parse(tmp_path: Path) -> None:
    make_warehouse(tmp_path / "w.db")
    config = load_config(write_config(tmp_path / "config.yaml", {
        "state_db": f"sqlite:///{tmp_path / 'state.db'}",
        "schedule": {"tick": "1s"},
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'w.db'}"}},
        "destinations": {"f": {"type": "jsonl", "path": str(tmp_path / "o.jsonl")}},
        "audiences": [{"name": "A", "source": "w", "destinations": ["f"],
                       "query": "SELECT id AS user_id FROM users"}],
    }))
    store = Store(config.state_db)
    store.upgrade()
    now = [1000.0]
    metrics = Metrics(store, config, monotonic=lambda: now[0])
    server = HealthServer(metrics, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        metrics.tick_started()
        metrics.tick_finished(True)
        assert http_get(f"{base}/healthz")[0] == 200
        now[0] += metrics.window + 1
        status, body = http_get(f"{base}/healthz")
        assert status == 503 and "late" in body
        metrics.tick_started()
        assert http_get(f"{base}/healthz")[0] == 200
        status, text = http_get(f"{base}/metrics")
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"audience_sync_ticks", "audience_sync_state_db_up",
                "audience_sync_deliveries_sent"} <= names
        assert http_get(f"{base}/nope")[0] == 404
    finally:
        server.stop()
        store.dispose()
