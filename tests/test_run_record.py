"""What a run records and prints: never a time before the last run's, and the figures of its
run record (a held run queued nothing)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from audience_sync.config import load_config
from audience_sync.runner import run_computation
from audience_sync.state import queries
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.helpers import cli, make_warehouse, set_users, write_config

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _users(*ids: str) -> list[tuple[object, ...]]:
    return [(uid, f"{uid}@example.com", None, None, None, 50.0) for uid in ids]


def _config(tmp_path: Path, state_url: str, *ids: str) -> Path:
    warehouse = tmp_path / "warehouse.db"
    make_warehouse(warehouse, _users(*ids))
    return write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}},
        "audiences": [{"name": "Scored", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id, email FROM users WHERE score > 10"}],
    })


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_clock_stepped_back_never_records_a_time_before_the_last_run(
        state_url: str, tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, state_url, "u1", "u2"))
    comp = config.computations[0]
    store = Store(state_url)
    store.upgrade()
    store.register(config.computations, T0)
    assert run_computation(store, config, comp, clock=lambda: T0).ok
    set_users(tmp_path / "warehouse.db", _users("u2", "u3"))  # u1 leaves, u3 enters
    records = _Records()
    runner_log = logging.getLogger("audience_sync.runner")
    runner_log.addHandler(records)
    try:
        assert run_computation(store, config, comp, clock=lambda: T0 - timedelta(hours=2)).ok
    finally:
        runner_log.removeHandler(records)
    h, d = t.membership_history, t.deliveries
    clocks = [record.clock for record in reversed(queries.runs(store))]
    with store.read() as conn:
        history = {row.user_id: (row.entered_at, row.exited_at)
                   for row in conn.execute(select(h.c.user_id, h.c.entered_at, h.c.exited_at))}
        observed = [row.observed_at for row in conn.execute(
            select(d.c.observed_at).order_by(d.c.id))]
    store.dispose()
    assert history == {"u1": (T0, T0), "u2": (T0, None), "u3": (T0, None)}
    assert observed == sorted(observed) and observed[-1] == T0  # identify times never go back
    assert clocks == [T0, T0]
    assert any("the clock went back by 2:00:00" in m for m in records.messages), records.messages


def test_a_held_run_prints_the_figures_of_its_run_record(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url, "u1", "u2", "u3", "u4", "u5")
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    set_users(tmp_path / "warehouse.db", _users("u1"))  # 4 of 5 leave: the guard holds
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code != 0
    line = next(line for line in out.splitlines() if line.startswith("scored:"))
    assert "held" in line and line.endswith(", 0 queued"), line
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    run = json.loads(out)["runs"][0]
    assert (run["status"], run["queued"]) == ("held", 0)
    code, out, err = cli(capsys, "--config", str(config), "runs", "--json")
    assert [r["queued"] for r in json.loads(out)] == [0, 0, 5]
