"""SIGKILL in the middle of a run: the previous state survives whole, the next run completes it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.helpers import write_config

CLI = str(Path(sys.executable).parent / "audience-sync")
USERS = 30_000


def fill(path: Path, high: range) -> None:
    """users(id, score): ids in `high` score 50 (members), everyone else 1."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS users (id TEXT PRIMARY KEY, email TEXT, score INT)")
    db.execute("DELETE FROM users")
    db.executemany("INSERT INTO users VALUES (?, ?, ?)", (
        (f"user-{i:07d}", f"user{i}@example.com", 50 if i in high else 1) for i in range(USERS)))
    db.commit()
    db.close()


def state(url: str) -> dict[str, Any]:
    store = Store(url)
    with store.read() as conn:
        out: dict[str, Any] = {
            name: conn.execute(select(func.count()).select_from(table)).scalar_one()
            for name, table in (("members", t.members), ("history", t.membership_history),
                                ("deliveries", t.deliveries), ("runs", t.runs))}
        out["open_intervals"] = conn.execute(select(func.count()).select_from(
            t.membership_history).where(t.membership_history.c.exited_at.is_(None))).scalar_one()
        out["computation"] = tuple(conn.execute(select(
            t.computations.c.member_count, t.computations.c.last_run_id,
            t.computations.c.initial_state)).one())
    store.dispose()
    return out


def applying(url: str, workdir: Path) -> Callable[[], bool]:
    """True once the run is writing its transaction (not merely loading the snapshot)."""
    if make_url(url).get_backend_name() == "sqlite":
        wal = Path(str(make_url(url).database) + "-wal")
        start = wal.stat().st_size if wal.exists() else 0
        return lambda: wal.exists() and wal.stat().st_size > start + 64 * 1024
    engine = create_engine(url)

    def probe() -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND pid <> pg_backend_pid() AND (query ILIKE '%as_delta%' "
                "OR query ILIKE '%as_exited%')")).scalar_one())

    return probe


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str,
             timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr and proc.stderr.read()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)  # poll interval


@pytest.mark.parametrize("moment", ["loading", "applying"])
def test_sigkill_mid_run_leaves_previous_state(tmp_path: Path, state_url: str,
                                               moment: str) -> None:
    warehouse = tmp_path / "w.db"
    fill(warehouse, range(0, 15_000))
    config = write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": "Scorers", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id, email FROM users WHERE score > 10"}],
    })
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.run([CLI, "--config", str(config), "sync", "--json"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = state(state_url)
    assert before["members"] == 15_000
    # Next run: 6,000 leave, 12,000 join.
    fill(warehouse, range(6_000, 27_000))
    probe = applying(state_url, tmp_path)
    proc = subprocess.Popen([CLI, "--config", str(config), "sync", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if moment == "loading":
            assert proc.stderr is not None
            line = proc.stderr.readline()  # the run announces itself before loading
            assert "run started" in line, line
        else:
            wait_for(probe, proc, "the run's transaction")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert state(state_url) == before

    again = subprocess.run([CLI, "--config", str(config), "sync", "--json"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    run = json.loads(again.stdout)["runs"][0]
    assert (run["kind"], run["entered"], run["exited"]) == ("incremental", 12_000, 6_000)
    after = state(state_url)
    assert after["members"] == 21_000
    assert after["history"] == 27_000 and after["open_intervals"] == 21_000
    assert after["deliveries"] == 15_000 + 18_000
    sent = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(sent) == 33_000
    assert len({json.loads(line)["messageId"] for line in sent}) == 33_000
