"""The real daemon in a subprocess: 1-second tick, short cadence, the fake Planhat."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from audience_sync.config import load_config
from audience_sync.leases import release, try_acquire
from audience_sync.state.store import Store
from tests.daemon_harness import (
    AUDIENCE_SYNC,
    DaemonProcess,
    delivery_statuses,
    http_get,
    latest_values,
    runs,
    stop_all,
    wait_until,
)
from tests.fakes import FakePlanhat
from tests.helpers import cli, make_warehouse, set_users, write_config

TENANT = "tenant-daemon-test"
FAST = {"timeout": 2, "max_retries": 8, "backoff_base": 0.01, "backoff_max": 0.1,
        "retry_later": 0}


def users(scores: dict[str, float]) -> list[tuple[Any, ...]]:
    return [(uid, f"{uid}@example.com", uid.upper(), None, None, score)
            for uid, score in sorted(scores.items())]


def daemon_config(tmp_path: Path, state_url: str, planhat_url: str, scores: dict[str, float],
                  *, every: str = "2s", mode: str = "segment") -> Path:
    make_warehouse(tmp_path / "warehouse.db", users(scores))
    planhat: dict[str, Any] = {"type": "planhat", "base_url": planhat_url,
                               "rate_limit": "5000/s", **FAST}
    if mode == "api":
        planhat.update(mode="api", api_token=TENANT)
    else:
        planhat.update(tenant_token=TENANT)
    return write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "schedule": {"every": every, "jitter": "0s", "tick": "1s"},
        "sources": {"warehouse": {"url": f"sqlite:///{tmp_path / 'warehouse.db'}"}},
        "destinations": {"planhat": planhat},
        "audiences": [{"name": "Scored", "source": "warehouse", "destinations": ["planhat"],
                       "query": "SELECT id AS user_id, email, name FROM users "
                                "WHERE score >= 10"}],
    })


@pytest.fixture
def planhat() -> Iterator[FakePlanhat]:
    fake = FakePlanhat(tenant_token=TENANT, api_token=TENANT)
    with fake.running():
        yield fake


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def truth(scores: dict[str, float]) -> dict[str, bool]:
    return {uid: score >= 10 for uid, score in scores.items()}


def expected_state(scores: dict[str, float], ever: set[str]) -> dict[str, bool]:
    """What the destination should hold: every user ever sent, true if a member now."""
    return {uid: member for uid, member in truth(scores).items() if member or uid in ever}


def test_daemon_initial_then_changes_only_cli_sync_beside_it_and_sigterm(
        tmp_path: Path, sqlite_url: str, planhat: FakePlanhat) -> None:
    scores = {f"u{i:02d}": float(i) for i in range(30)}  # u10..u29 are members
    config = daemon_config(tmp_path, sqlite_url, planhat.url, scores)
    store = Store(sqlite_url)
    daemon = DaemonProcess(config, tmp_path / "daemon.log", "--health-port", "0")
    try:
        # Initial sync: every member sent true, once.
        wait_until(lambda: len(planhat.messages) >= 20, "the initial sync")
        assert latest_values(planhat.messages, "scored") == dict.fromkeys(
            [f"u{i}" for i in range(10, 30)], True)
        # The cadence goes on: an incremental run with no change sends nothing.
        wait_until(lambda: any(r["kind"] == "incremental" for r in runs(store)),
                   "an incremental run")
        assert len(planhat.messages) == 20
        # Changes in the source: only they are sent.
        scores.update(u10=0.0, u05=50.0)
        set_users(tmp_path / "warehouse.db", users(scores))
        wait_until(lambda: len(planhat.messages) >= 22, "the incremental changes")
        assert {(m["userId"], m["traits"]["scored"]) for m in planhat.messages[20:]} == \
            {("u10", False), ("u05", True)}

        # CLI syncs while the daemon runs: they take the lease, the daemon does not repeat
        # their work, and nothing is sent twice.
        scores.update(u06=60.0)
        set_users(tmp_path / "warehouse.db", users(scores))
        for _ in range(3):
            done = subprocess.run([AUDIENCE_SYNC, "--config", str(config), "sync", "--json"],
                                  capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr
        wait_until(lambda: delivery_statuses(store).get("pending", 0) == 0 and
                   len(planhat.messages) >= 23, "the CLI's change")
        assert planhat.duplicates() == {}
        assert len(planhat.messages) == 23
        assert latest_values(planhat.messages, "scored") == \
            expected_state(scores, {"u10"})
        committed = [r for r in runs(store) if r["status"] == "succeeded"]
        assert len({r["fencing_token"] for r in committed}) == len(committed)

        # Health and metrics.
        port = daemon.health_port()
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body)}
        members = {s.labels["audience"]: s.value for s in families["audience_sync_members"].samples}
        assert members == {"scored": 21.0}
        run_samples = [s for s in families["audience_sync_runs"].samples
                       if s.name == "audience_sync_runs_total"]
        assert sum(s.value for s in run_samples if s.labels["kind"] == "initial") == 1
        sent = [s for s in families["audience_sync_deliveries_sent"].samples
                if s.name == "audience_sync_deliveries_sent_total"]
        assert sum(s.value for s in sent) >= 22
        assert "audience_sync_last_success_timestamp_seconds" in families
        assert families["audience_sync_state_db_up"].samples[0].value == 1
    finally:
        code = daemon.stop()
    assert code == 0
    logged = daemon.records()
    assert any(r["message"].endswith("stopped") for r in logged)
    assert any("incremental run succeeded" in r["message"] for r in logged)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in logged)
    assert delivery_statuses(store).get("pending", 0) == 0
    store.dispose()


def test_sigterm_mid_drain_finishes_the_batch_in_flight_and_loses_nothing(
        tmp_path: Path, sqlite_url: str, planhat: FakePlanhat) -> None:
    scores = {f"u{i:03d}": 50.0 for i in range(300)}
    config = daemon_config(tmp_path, sqlite_url, planhat.url, scores, every="1h")
    store = Store(sqlite_url)
    planhat.hold_after(40)  # park the drain in the middle of the initial sync
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        assert planhat.held.wait(60)
        daemon.signal(signal.SIGTERM)
        wait_until(lambda: any("finishing the batch" in r["message"] for r in daemon.records()),
                   "the daemon to acknowledge SIGTERM")
        planhat.unhold()  # the parked requests fail; the client retries them and finishes
        assert daemon.wait() == 0
    finally:
        stop_all([daemon])
    statuses = delivery_statuses(store)
    acked = {m["messageId"] for m in planhat.messages}
    assert statuses.get("sent", 0) == len(acked) < 300
    assert statuses.get("sent", 0) + statuses.get("pending", 0) == 300
    # The rest goes out after a restart; nothing was lost, nothing acknowledged twice.
    again = DaemonProcess(config, tmp_path / "daemon2.log")
    try:
        wait_until(lambda: delivery_statuses(store).get("pending", 0) == 0, "the rest")
    finally:
        assert again.stop() == 0
    assert latest_values(planhat.messages, "scored") == truth(scores)
    assert planhat.duplicates() == {}
    assert [r["kind"] for r in runs(store)] == ["initial"]
    store.dispose()


def test_cli_sync_waits_for_the_lease_or_gives_up_with_no_wait(
        tmp_path: Path, sqlite_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str]) -> None:
    scores = {"u1": 50.0, "u2": 1.0}
    config_path = daemon_config(tmp_path, sqlite_url, planhat.url, scores)
    assert cli(capsys, "--config", str(config_path), "sync")[0] == 0
    config = load_config(config_path)
    store = Store(config.state_db)
    lease = try_acquire(store, "scored", "daemon@host-7", ttl=timedelta(minutes=5),
                        at=datetime.now(UTC))
    assert lease is not None
    code, _out, err = cli(capsys, "--config", str(config_path), "sync", "--no-wait")
    assert code == 1
    assert "daemon@host-7 holds the lease" in err
    waiting = subprocess.Popen([AUDIENCE_SYNC, "--config", str(config_path), "sync", "Scored"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert waiting.stderr is not None
        line = waiting.stderr.readline()
        assert "for the lease held by daemon@host-7" in line
        assert waiting.poll() is None
        release(store, lease)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, err
    assert "scored: incremental succeeded" in out
    store.dispose()
