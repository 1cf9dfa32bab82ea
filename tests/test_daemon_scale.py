"""Daemons under stress: SIGKILL in an initial sync, and several daemons on one PostgreSQL."""

from __future__ import annotations

import itertools
import random
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from audience_sync.state.store import Store
from tests.conftest import drop_pg_schema, new_pg_schema
from tests.daemon_harness import (
    DaemonProcess,
    delivery_statuses,
    latest_values,
    runs,
    stop_all,
    wait_until,
)
from tests.fakes import FakePlanhat
from tests.helpers import make_warehouse, set_users, write_config
from tests.test_daemon import FAST, TENANT, daemon_config


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    schema, url = new_pg_schema(pg_admin_url)
    try:
        yield url
    finally:
        drop_pg_schema(pg_admin_url, schema)


def test_sigkill_in_an_initial_sync_of_20000_resumes_after_restart(tmp_path: Path) -> None:
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    scores = {f"user{i:05d}": 99.0 for i in range(20_000)}
    planhat = FakePlanhat(api_token=TENANT)
    with planhat.running():
        config = daemon_config(tmp_path, state_url, planhat.url, scores, every="1h", mode="api")
        store = Store(state_url)
        # The first bulk request of 5,000 is acknowledged; the second hangs: we are mid-sync.
        planhat.hold_after(5_000)
        args = ("--owner", "daemon-k", "--lease-ttl", "5s")
        first = DaemonProcess(config, tmp_path / "first.log", *args)
        try:
            assert planhat.held.wait(120)
            first.signal(signal.SIGKILL)
            assert first.wait() == -signal.SIGKILL
        finally:
            stop_all([first])
        planhat.unhold()
        assert delivery_statuses(store) == {"sent": 5_000, "pending": 15_000}
        assert store.computation("scored").initial_state == "delivering"  # type: ignore[union-attr]
        second = DaemonProcess(config, tmp_path / "second.log", *args)
        try:
            wait_until(lambda: delivery_statuses(store) == {"sent": 20_000}, "the rest", 120)
            wait_until(lambda: store.computation("scored").initial_state == "complete",  # type: ignore[union-attr]
                       "the initial sync to complete")
        finally:
            assert second.stop() == 0
    # Resumed, not started over: one initial run, each member sent exactly once.
    assert [r["kind"] for r in runs(store)] == ["initial"]
    assert sum(len(items) for items in planhat.bulk_requests) == 20_000
    assert planhat.duplicates() == {}
    assert len(planhat.endusers) == 20_000
    assert all(user["custom"]["scored"] is True for user in planhat.endusers.values())
    store.dispose()


GROUPS = 20
SCALE_TEST_SECONDS = 60
PER_GROUP = 20
DAEMONS = 3
# The fake enforces Planhat's real limit in total; each daemon is configured with all of it and
# the budget they share in the state store keeps them within it together.
TOTAL_RATE = 150


def group_users(scores: dict[str, float]) -> list[tuple[Any, ...]]:
    return [(uid, f"{uid}@example.com", None, uid.split("_")[0], None, score)
            for uid, score in sorted(scores.items())]


def test_three_daemons_share_twenty_audiences_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    rng = random.Random(5)
    scores = {f"g{g}_{u}": rng.choice((0.0, 50.0)) for g in range(GROUPS)
              for u in range(PER_GROUP)}
    warehouse = tmp_path / "warehouse.db"
    make_warehouse(warehouse, group_users(scores))
    # A burst of 10 (Planhat itself allows 50 in parallel): enough to absorb scheduling jitter
    # between three processes on one small machine, far too little to hide a limiter that
    # lets each daemon use the whole rate on its own.
    planhat = FakePlanhat(tenant_token=TENANT, rate=TOTAL_RATE, burst=10)
    every = timedelta(seconds=2)
    with planhat.running():
        config = write_config(tmp_path / "config.yaml", {
            "state_db": pg_url,
            "schedule": {"every": "2s", "jitter": "0s", "tick": "1s"},
            "sources": {"warehouse": {"url": f"sqlite:///{warehouse}"}},
            "destinations": {"planhat": {
                "type": "planhat", "tenant_token": TENANT, "base_url": planhat.url,
                "rate_limit": f"{TOTAL_RATE}/s", "concurrency": 2, **FAST}},
            "audiences": [{"name": f"Group {g}", "source": "warehouse",
                           "destinations": ["planhat"],
                           "query": f"SELECT id AS user_id, email FROM users "
                                    f"WHERE title = 'g{g}' AND score >= 10"}
                          for g in range(GROUPS)],
        })
        store = Store(pg_url)
        daemons = [DaemonProcess(config, tmp_path / f"daemon{i}.log", "--owner", f"d{i}")
                   for i in range(DAEMONS)]
        ever_sent: set[str] = set()

        def delivered() -> bool:
            for g in range(GROUPS):
                truth = {uid: s >= 10 for uid, s in scores.items()
                         if uid.startswith(f"g{g}_") and (s >= 10 or uid in ever_sent)}
                if latest_values(planhat.messages, f"group_{g}") != truth:
                    return False
            return True

        try:
            # A minute of rounds: inject changes, wait until the daemons delivered them.
            until = time.monotonic() + SCALE_TEST_SECONDS
            while time.monotonic() < until:
                wait_until(delivered, "every change to reach the destination", 60)
                ever_sent.update(m["userId"] for m in planhat.messages)
                for uid in rng.sample(sorted(scores), 40):
                    scores[uid] = 50.0 - scores[uid]
                set_users(warehouse, group_users(scores))
            wait_until(delivered, "the last changes to reach the destination", 60)
        finally:
            codes = [d.stop() for d in daemons]
            stop_all(daemons)
    assert codes == [0] * DAEMONS
    assert planhat.statuses.get(429, 0) == 0
    assert planhat.duplicates() == {}
    assert delivery_statuses(store).get("pending", 0) == 0
    # No run committed twice: per audience, fencing tokens strictly increase and each run
    # started no earlier than its slot (the previous run's end + every).
    by_key: dict[str, list[dict[str, Any]]] = {}
    for run in runs(store):
        by_key.setdefault(run["key"], []).append(run)
    assert len(by_key) == GROUPS
    for key, items in by_key.items():
        tokens = [r["fencing_token"] for r in items]
        assert tokens == sorted(set(tokens)), key
        for before, after in itertools.pairwise(items):
            assert after["clock"] >= before["finished_at"] + every - timedelta(milliseconds=50), \
                key
    # The audiences were spread over the daemons.
    working = [d for d in daemons if any("run succeeded" in r["message"] for r in d.records())]
    assert len(working) >= 2
    store.dispose()
