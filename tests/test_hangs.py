"""No hang: `timeout` bounds a whole request, and SIGTERM ends the daemon within 5 s.

A server that trickles its answer a byte at a time never trips httpx's per-read timeouts; a
server that accepts and never answers holds a request for its full timeout. Neither may keep
`sync` past its timeout per request, nor the daemon past 5 s after SIGTERM; what they held
stays pending, never failed.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from audience_sync.config import PlanhatConfig
from audience_sync.destinations.planhat import PlanhatSegmentDestination
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.daemon_harness import DaemonProcess, delivery_statuses, stop_all, wait_until
from tests.delivery_setup import TENANT_TOKEN, delivery_config, set_env
from tests.fakes import FakePlanhat
from tests.helpers import cli, make_warehouse, write_config

# Per-read timeouts never trip on a trickle: a byte arrives well within each.
TRICKLE_INTERVAL = 0.2


@pytest.fixture
def planhat() -> Iterator[FakePlanhat]:
    fake = FakePlanhat(TENANT_TOKEN, trickle_interval=TRICKLE_INTERVAL)
    with fake.running():
        yield fake


def _errors(store: Store) -> list[tuple[str, str | None]]:
    d = t.deliveries
    with store.read() as conn:
        return [(row.status, row.last_error) for row in conn.execute(
            select(d.c.status, d.c.last_error))]


@pytest.mark.parametrize("kind", ["trickle", "stall"])
def test_sync_gives_up_within_timeout_per_request(
        tmp_path: Path, planhat: FakePlanhat, kind: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    set_env(monkeypatch)
    state = f"sqlite:///{tmp_path / 'state.db'}"
    timeout, attempts = 1.0, 2
    config = delivery_config(tmp_path, state, planhat=planhat.url, trait=False, overrides={
        "planhat": {"timeout": timeout, "max_retries": attempts - 1}})
    planhat.fail_next(100, kind)
    started = time.monotonic()
    cli(capsys, "--config", str(config), "sync", "--json")
    elapsed = time.monotonic() - started
    # Three members, sent side by side: each request ends at its deadline, twice.
    assert elapsed < attempts * timeout + 2.0, elapsed
    assert planhat.requests >= 3 and not planhat.messages
    store = Store(state)
    try:
        errors = _errors(store)
        assert errors and all(status == "pending" for status, _ in errors)
        assert all(error is not None and "timed out" in error for _, error in errors)
    finally:
        store.dispose()


def _daemon_config(tmp_path: Path, state_url: str, planhat_url: str) -> Path:
    make_warehouse(tmp_path / "warehouse.db",
                   [(f"u{i}", f"u{i}@example.com", None, None, None, 50.0) for i in range(8)])
    planhat: dict[str, Any] = {"type": "planhat", "tenant_token": TENANT_TOKEN,
                               "base_url": planhat_url, "rate_limit": "1000/s",
                               # Long enough that only an interrupt ends the request in time.
                               "timeout": "60s", "max_retries": 3, "backoff_base": 0.01,
                               "backoff_max": 0.1}
    return write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "schedule": {"every": "1h", "jitter": "0s", "tick": "1s"},
        "sources": {"warehouse": {"url": f"sqlite:///{tmp_path / 'warehouse.db'}"}},
        "destinations": {"planhat": planhat},
        "audiences": [{"name": "Scored", "source": "warehouse", "destinations": ["planhat"],
                       "query": "SELECT id AS user_id, email FROM users WHERE score >= 10"}],
    })


@pytest.mark.parametrize("kind", ["stall", "trickle"])
def test_daemon_exits_within_5s_of_sigterm_while_a_request_hangs(
        tmp_path: Path, state_url: str, planhat: FakePlanhat, kind: str) -> None:
    config = _daemon_config(tmp_path, state_url, planhat.url)
    planhat.fail_next(1000, kind)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    store = Store(state_url)
    try:
        wait_until(lambda: planhat.in_flight > 0, "a request to hang", timeout=60)
        stopped = time.monotonic()
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(30)
        took = time.monotonic() - stopped
        assert took < 5.0, took
        assert code == 0
        # What was on the wire stays pending, to be sent by the next drain; nothing failed.
        assert delivery_statuses(store) == {"pending": 8}
        logged = [r["message"] for r in daemon.records()]
        assert any(m.endswith("stopped") for m in logged), logged
    finally:
        stop_all([daemon])
        store.dispose()
    assert not planhat.messages


def test_trickled_answer_ends_at_the_total_deadline() -> None:
    """One request, no retry: a byte every 0.2 s never trips a 1 s read timeout; the total
    deadline ends it at 1 s, and the error says so."""
    fake = FakePlanhat(TENANT_TOKEN, trickle_interval=TRICKLE_INTERVAL)
    with fake.running():
        fake.fail_next(10, "trickle")
        settings = PlanhatConfig.model_validate({
            "type": "planhat", "tenant_token": TENANT_TOKEN, "base_url": fake.url,
            "timeout": 1, "max_retries": 0})
        destination = PlanhatSegmentDestination("planhat", settings)
        try:
            started = time.monotonic()
            reply = destination.sender.call("POST", "/dock/segment", content=json.dumps(
                {"type": "identify"}).encode())
            assert time.monotonic() - started < 2.0
        finally:
            destination.close()
    assert reply.status is None and reply.error is not None
    assert reply.error.startswith("timed out after 1s")
