"""A CLI drain beside a real daemon (a subprocess) on the same state store and destination.

`retry` must take the audience lease the daemon holds, so no message is sent twice (on SQLite
claims take no row lock: the lease alone makes a claim exclusive); and a CLI `sync` must take its
requests from the destination's budget the daemon draws from, so the two together keep the
configured rate.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from audience_sync.config import load_config
from audience_sync.runner import run_computation
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.daemon_harness import (
    AUDIENCE_SYNC,
    DaemonProcess,
    delivery_statuses,
    stop_all,
    wait_until,
)
from tests.fakes import Answer, FakePlanhat
from tests.helpers import make_warehouse, write_config

TENANT = "tenant-race-test"
FAST = {"timeout": 2, "max_retries": 8, "backoff_base": 0.01, "backoff_max": 0.1,
        "retry_later": 0, "concurrency": 4}


def _config(path: Path, state_url: str, warehouse: Path, planhat_url: str, rate: str,
            audiences: dict[str, str]) -> Path:
    """audiences: name -> the user id prefix of its members."""
    return write_config(path, {
        "state_db": state_url,
        # The daemon only drains here: its audiences were run before it started.
        "schedule": {"every": "1h", "jitter": "0s", "tick": "1s"},
        "sources": {"warehouse": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"planhat": {"type": "planhat", "tenant_token": TENANT,
                                     "base_url": planhat_url, "rate_limit": rate, **FAST}},
        "audiences": [{"name": name, "source": "warehouse", "destinations": ["planhat"],
                       "query": f"SELECT id AS user_id FROM users WHERE id LIKE '{prefix}%'"}
                      for name, prefix in audiences.items()],
    })


def _warehouse(path: Path, counts: dict[str, int]) -> Path:
    make_warehouse(path, [(f"{prefix}{i:05d}", None, None, None, None, 50.0)
                          for prefix, n in counts.items() for i in range(n)])
    return path


def _run_all(config_path: Path) -> Store:
    """Run every audience of the config once (queueing its deliveries), sending nothing."""
    config = load_config(config_path)
    store = Store(config.state_db)
    store.upgrade()
    store.register(config.computations, time_now())
    for comp in config.computations:
        assert run_computation(store, config, comp).ok
    return store


def time_now() -> Any:
    from audience_sync.clock import utcnow
    return utcnow()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUDIENCE_SYNC, "--config", str(config), *args], capture_output=True,
                          text=True, timeout=180, check=False)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    try:
        yield started
    finally:
        stop_all(started)


DELIVERIES = 2000


def test_retry_beside_a_draining_daemon_sends_no_message_twice(
        state_url: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    # A server slow enough (its rate) that the daemon is still draining when retry starts.
    planhat = FakePlanhat(tenant_token=TENANT)
    with planhat.running():
        warehouse = _warehouse(tmp_path / "warehouse.db", {"u": DELIVERIES})
        config = _config(tmp_path / "config.yaml", state_url, warehouse, planhat.url,
                         "400/s", {"Everyone": "u"})
        store = _run_all(config)
        # One delivery in ten failed earlier: retry has something to re-queue, then drains.
        d = t.deliveries
        with store.write() as conn:
            conn.execute(update(d).where(d.c.id % 10 == 0)
                         .values(status="failed", last_error="HTTP 400 (earlier)"))
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        daemons.append(daemon)
        wait_until(lambda: len(planhat.acked) >= 100, "the daemon to start draining", 60)
        left = DELIVERIES - 200 - len(planhat.acked)
        retried = _cli(config, "retry", "--drain")
        # It started while the daemon still had most of the outbox to send.
        assert left > DELIVERIES / 2, f"only {left} deliveries left when retry started"
        assert retried.returncode == 0, retried.stderr
        assert "re-queued 200 failed deliveries" in retried.stdout
        wait_until(lambda: delivery_statuses(store) == {"sent": DELIVERIES},
                   "every delivery sent", 120)
        assert daemon.stop() == 0
        assert planhat.duplicates() == {}
        assert len(planhat.acked) == DELIVERIES
        store.dispose()


class _TimedPlanhat(FakePlanhat):
    """Remembers when each identify was acknowledged, and for whom."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.times: list[tuple[float, str]] = []

    def route(self, method: str, path: str, auth: str, body: bytes) -> Answer:
        answer = super().route(method, path, auth, body)
        if answer.status == 200:
            with self.lock:
                self.times.append((time.monotonic(), json.loads(body)["userId"]))
        return answer


RATE = 40


def test_a_cli_sync_beside_the_daemon_draws_from_the_same_rate_budget(
        state_url: str, tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    planhat = _TimedPlanhat(tenant_token=TENANT)
    with planhat.running():
        warehouse = _warehouse(tmp_path / "warehouse.db", {"a": 240, "b": 160})
        # The daemon knows audience A only, the CLI audience B: each drains its own.
        daemon_config = _config(tmp_path / "daemon.yaml", state_url, warehouse, planhat.url,
                                f"{RATE}/s", {"Alpha": "a"})
        cli_config = _config(tmp_path / "cli.yaml", state_url, warehouse, planhat.url,
                             f"{RATE}/s", {"Beta": "b"})
        _run_all(daemon_config).dispose()
        daemon = DaemonProcess(daemon_config, tmp_path / "daemon.log")
        daemons.append(daemon)
        wait_until(lambda: len(planhat.times) >= 20, "the daemon to start draining", 60)
        synced = _cli(cli_config, "sync")
        assert synced.returncode == 0, synced.stderr
        wait_until(lambda: len(planhat.times) >= 400, "every delivery sent", 60)
        assert daemon.stop() == 0
    times = sorted(planhat.times)
    alpha = [at for at, user in times if user.startswith("a")]
    beta = [at for at, user in times if user.startswith("b")]
    overlap = min(alpha[-1], beta[-1]) - max(alpha[0], beta[0])
    assert overlap >= 2.0, f"the two drains overlapped only {overlap:.1f}s"
    arrivals = [at for at, _user in times]
    start = arrivals[0] + 1.0  # past the first second: each process's first slot is free
    busiest = max(sum(1 for at in arrivals[i:] if at < first + 1.0)
                  for i, first in enumerate(arrivals) if first >= start)
    # Each process alone would send RATE; apart they sent twice that. The margin is for a
    # process stalled on a busy machine sending the slots it missed at once.
    assert busiest <= RATE * 1.2, f"{busiest} requests in one second at {RATE}/s"
    assert planhat.duplicates() == {}
