"""Housekeeping and config conveniences on SQLite and PostgreSQL: `prune` keeps pending and
failed deliveries and all history, the daemon prunes once a day, `forget` drops an orphan's
current state (and its history with --purge), `enabled: false`, `${VAR:-default}`, and every
skip reason in the run record."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from audience_sync.config import load_config
from audience_sync.state import housekeeping
from audience_sync.state import schema as t
from audience_sync.state.housekeeping import claim_daily
from audience_sync.state.store import Store
from audience_sync.states import DeliveryStatus
from tests.helpers import cli, make_warehouse, write_config

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _users(n: int) -> list[tuple[object, ...]]:
    return [(f"u{i}", None, None, None, None, 50.0) for i in range(n)]


def _audience(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": "w", "destinations": ["file"],
            "query": "SELECT id AS user_id FROM users", **extra}


def _config(tmp_path: Path, state_url: str, audiences: list[dict[str, Any]],
            traits: list[dict[str, Any]] | None = None) -> str:
    if not (tmp_path / "w.db").exists():
        make_warehouse(tmp_path / "w.db", _users(4))
    document: dict[str, Any] = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'w.db'}"}},
        "destinations": {"file": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}},
        "audiences": audiences,
    }
    if traits:
        document["computed_traits"] = traits
    return str(write_config(tmp_path / "config.yaml", document))


def _count(store: Store, table: Any, *where: Any) -> int:
    with store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where))
                   .scalar_one())


# -- prune -------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_prune_keeps_pending_and_failed_rows_and_history(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, chunk: int | None) -> None:
    if chunk is not None:  # walked in transactions of `chunk` deliveries
        monkeypatch.setattr(housekeeping, "PRUNE_CHUNK", chunk)
    config = _config(tmp_path, state_url, [_audience("A")])
    assert cli(capsys, "--config", config, "sync")[0] == 0  # 4 sent deliveries
    store = Store(state_url)
    d = t.deliveries
    old = datetime.now(UTC) - timedelta(days=40)
    with store.read() as conn:
        ids = list(conn.execute(select(d.c.id).order_by(d.c.id)).scalars())
    statuses = [DeliveryStatus.SENT, DeliveryStatus.SUPERSEDED, DeliveryStatus.PENDING,
                DeliveryStatus.FAILED]
    with store.write() as conn:
        for delivery_id, status in zip(ids, statuses, strict=True):
            conn.execute(update(d).where(d.c.id == delivery_id).values(
                status=status, observed_at=old,
                sent_at=old if status == DeliveryStatus.SENT else None))
    history = _count(store, t.membership_history)
    code, out, _ = cli(capsys, "--config", config, "prune", "--older-than", "30d")
    assert code == 0 and out.startswith("pruned 2 ")
    with store.read() as conn:
        left = sorted(conn.execute(select(d.c.status)).scalars())
    assert left == [DeliveryStatus.FAILED, DeliveryStatus.PENDING]
    assert _count(store, t.membership_history) == history == 4
    assert _count(store, t.runs) == 1
    # Recent sent rows are kept; --json says how many went.
    code, out, _ = cli(capsys, "--config", config, "prune", "--json")
    assert code == 0 and json.loads(out)["pruned"] == 0
    store.dispose()


def test_the_daily_prune_is_claimed_once_a_day(state_url: str) -> None:
    store = Store(state_url)
    store.upgrade()
    assert claim_daily(store, "prune", T0) is True
    assert claim_daily(store, "prune", T0 + timedelta(hours=23)) is False
    assert claim_daily(store, "prune", T0 + timedelta(hours=24)) is True
    assert claim_daily(store, "prune", T0 + timedelta(hours=25)) is False
    store.dispose()


def test_prune_older_than_must_be_a_duration(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url, [_audience("A")])
    code, _, err = cli(capsys, "--config", config, "prune", "--older-than", "soon")
    assert code == 2 and "--older-than" in err


# -- forget ------------------------------------------------------------------------------------

def _orphan(tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    """A and B synced; then B is removed from the config."""
    _config(tmp_path, state_url, [_audience("A"), _audience("B")])
    assert cli(capsys, "--config", str(tmp_path / "config.yaml"), "sync")[0] == 0
    return _config(tmp_path, state_url, [_audience("A")])


def _status(capsys: pytest.CaptureFixture[str], config: str) -> dict[str, dict[str, Any]]:
    code, out, _ = cli(capsys, "--config", config, "status", "--json")
    assert code == 0
    return {item["key"]: item for item in json.loads(out)["computations"]}


def test_forget_drops_an_orphans_state_and_keeps_its_history(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _orphan(tmp_path, state_url, capsys)
    assert _status(capsys, config)["b"]["orphaned"] is True
    store = Store(state_url)
    cid = store.computation("b").id  # type: ignore[union-attr]
    code, out, _ = cli(capsys, "--config", config, "forget", "b", "--yes")
    assert code == 0 and "4 members and 4 deliveries deleted; history kept" in out
    assert "b" not in _status(capsys, config)
    assert _count(store, t.members, t.members.c.computation_id == cid) == 0
    assert _count(store, t.deliveries, t.deliveries.c.computation_id == cid) == 0
    history = t.membership_history
    assert _count(store, history, history.c.computation_id == cid) == 4
    # Its stays end when it was forgotten: nobody is "in" it any more.
    assert _count(store, history, history.c.computation_id == cid,
                  history.c.exited_at.is_(None)) == 0
    assert _count(store, t.runs, t.runs.c.computation_id == cid) == 1
    # Configured again, it starts over with an initial run.
    config = _config(tmp_path, state_url, [_audience("A"), _audience("B")])
    assert cli(capsys, "--config", config, "sync", "b")[0] == 0
    assert _status(capsys, config)["b"]["members"] == 4
    assert _count(store, history, history.c.computation_id == cid,
                  history.c.exited_at.is_(None)) == 4
    store.dispose()


def test_forget_purge_drops_the_history_too(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _orphan(tmp_path, state_url, capsys)
    store = Store(state_url)
    cid = store.computation("b").id  # type: ignore[union-attr]
    code, out, _ = cli(capsys, "--config", config, "forget", "b", "--yes", "--purge")
    assert code == 0 and "history rows and runs deleted" in out
    assert store.computation("b") is None
    history = t.membership_history
    assert _count(store, history, history.c.computation_id == cid) == 0
    assert _count(store, t.runs, t.runs.c.computation_id == cid) == 0
    assert _count(store, history) == 4  # A's history is untouched
    store.dispose()


def test_forget_refuses_a_configured_audience_and_asks_for_yes(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _orphan(tmp_path, state_url, capsys)
    code, _, err = cli(capsys, "--config", config, "forget", "a", "--yes")
    assert code == 2 and "is configured" in err
    # Without a terminal to ask on (pytest's stdin) and without --yes: exit 2, nothing done.
    code, _, err = cli(capsys, "--config", config, "forget", "b")
    assert code == 2 and "--yes" in err
    assert _status(capsys, config)["b"]["members"] == 4
    code, _, err = cli(capsys, "--config", config, "forget", "nope", "--yes")
    assert code == 2 and "no orphaned audience 'nope'" in err


# -- enabled: false, ${VAR:-default} -----------------------------------------------------------

def test_a_disabled_audience_is_kept_not_run_and_not_orphaned(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url, [_audience("A"), _audience("B")])
    assert cli(capsys, "--config", config, "sync")[0] == 0
    config = _config(tmp_path, state_url, [_audience("A"), _audience("B", enabled=False)])
    code, out, _ = cli(capsys, "--config", config, "sync")
    assert code == 0 and "b:" not in out and "a:" in out
    code, _, err = cli(capsys, "--config", config, "sync", "B")
    assert code == 2 and "b is disabled (enabled: false)" in err
    status = _status(capsys, config)
    assert status["b"]["orphaned"] is False and status["b"]["enabled"] is False
    assert status["b"]["members"] == 4  # kept
    code, _, err = cli(capsys, "--config", config, "forget", "b", "--yes")
    assert code == 2 and "is configured" in err


def test_env_defaults_fill_unset_or_empty_variables(tmp_path: Path) -> None:
    config = _config(tmp_path, "sqlite:///${STATE_FILE:-state.db}", [_audience("A")])
    assert load_config(config, env={}).state_db.endswith("/state.db")
    assert load_config(config, env={"STATE_FILE": ""}).state_db.endswith("/state.db")
    assert load_config(config, env={"STATE_FILE": "x.db"}).state_db.endswith("/x.db")


# -- every skip reason in the run record -------------------------------------------------------

def test_the_run_record_holds_bad_type_and_non_finite_skips(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    query = ("SELECT id AS user_id, CASE WHEN id = 'u0' THEN 9e999 ELSE 1 END AS value "
             "FROM users UNION ALL SELECT x'0102', 1")
    config = _config(tmp_path, state_url, [_audience("A")],
                     [{"name": "T", "source": "w", "destinations": ["file"], "query": query}])
    assert cli(capsys, "--config", config, "sync", "T")[0] == 0
    code, out, _ = cli(capsys, "--config", config, "runs", "T", "--json")
    assert code == 0
    skipped = json.loads(out)[0]["skipped"]
    assert (skipped["bad_type"], skipped["non_finite"]) == (1, 1)
    status = _status(capsys, config)["t"]["last_run"]["skipped"]
    assert (status["bad_type"], status["non_finite"]) == (1, 1)
