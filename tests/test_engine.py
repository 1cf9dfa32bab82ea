"""The membership engine on SQLite and PostgreSQL state stores, through the CLI and the runner."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from audience_sync.config import Config, load_config
from audience_sync.runner import run_computation
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.helpers import cli, make_warehouse, set_users, write_config

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def user(uid: Any, score: float | None = 20, email: str | None = None) -> tuple[Any, ...]:
    return (uid, email or f"{uid}@example.com", f"Name {uid}", "CTO", "c1", score)


@dataclass
class Project:
    path: Path
    warehouse: Path
    state_url: str
    out: Path

    @property
    def config(self) -> Config:
        return load_config(self.path)

    def store(self) -> Store:
        store = Store(self.state_url)
        store.upgrade()
        return store

    def count(self, table: Any, *where: Any) -> int:
        store = self.store()
        with store.read() as conn:
            n = int(conn.execute(select(func.count()).select_from(table).where(*where))
                    .scalar_one())
        store.dispose()
        return n

    def sent(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]


@pytest.fixture
def project(tmp_path: Path, state_url: str) -> Project:
    warehouse = tmp_path / "warehouse.db"
    make_warehouse(warehouse, users=[user(f"u{i}") for i in range(1, 6)])
    doc = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": "out/identify.jsonl"}},
        "audiences": [{
            "name": "High Scorers", "source": "w", "destinations": ["file"],
            "query": "SELECT id AS user_id, email, name, title FROM users WHERE score > 10",
        }],
        "computed_traits": [{
            "name": "Score", "source": "w", "destinations": ["file"],
            "query": "SELECT id AS user_id, score AS value FROM users WHERE score IS NOT NULL",
        }],
    }
    path = write_config(tmp_path / "config.yaml", doc)
    return Project(path, warehouse, state_url, tmp_path / "out" / "identify.jsonl")


def sync(capsys: pytest.CaptureFixture[str], project: Project, *args: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "--config", str(project.path), "sync", "--json", *args)
    doc: dict[str, Any] = json.loads(out)
    doc["exit_code"] = code
    doc["stderr"] = err
    return doc


def by_key(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {run["key"]: run for run in doc["runs"]}


def test_initial_incremental_nochange_resync(project: Project,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(T0):
        first = by_key(sync(capsys, project))
    assert first["high_scorers"]["kind"] == "initial"
    assert (first["high_scorers"]["entered"], first["high_scorers"]["queued"]) == (5, 5)
    messages = project.sent()
    audience = [m for m in messages if "high_scorers" in m["traits"]]
    assert sorted(m["userId"] for m in audience) == [f"u{i}" for i in range(1, 6)]
    assert all(m["traits"]["high_scorers"] is True for m in audience)
    u1 = next(m for m in audience if m["userId"] == "u1")
    assert u1["traits"]["email"] == "u1@example.com"
    assert u1["context"]["personas"]["computation_class"] == "audience"
    assert u1["timestamp"] == "2026-11-01T12:00:00.000Z"

    # u1 leaves (score 5), u6 joins: only those are sent. u2's new email alone is no
    # membership change: it travels with u2's next call (the resync below).
    set_users(project.warehouse, [user("u1", 5), user("u2", email="new@example.com"),
                                  *(user(f"u{i}") for i in range(3, 7))])
    with freeze_time(T0 + timedelta(hours=2)):
        second = by_key(sync(capsys, project))
    run = second["high_scorers"]
    assert (run["kind"], run["entered"], run["exited"], run["changed"]) == \
        ("incremental", 1, 1, 0)
    new = [m for m in project.sent()[len(messages):] if "high_scorers" in m["traits"]]
    assert {(m["userId"], m["traits"]["high_scorers"]) for m in new} == \
        {("u1", False), ("u6", True)}
    assert next(m for m in new if m["userId"] == "u1")["traits"]["email"] == "u1@example.com"

    before = project.count(t.deliveries)
    with freeze_time(T0 + timedelta(hours=4)):
        third = by_key(sync(capsys, project))
    assert third["high_scorers"]["queued"] == 0 and third["score"]["queued"] == 0
    assert project.count(t.deliveries) == before

    sent_before = len(project.sent())
    code, out, _ = cli(capsys, "--config", str(project.path), "resync", "high scorers",
                       "--json")
    assert code == 0
    resync_run = json.loads(out)["runs"][0]
    assert (resync_run["kind"], resync_run["queued"]) == ("resync", 5)
    resent = project.sent()[sent_before:]
    assert sorted(m["userId"] for m in resent) == ["u2", "u3", "u4", "u5", "u6"]
    assert next(m for m in resent if m["userId"] == "u2")["traits"]["email"] == \
        "new@example.com"
    # A resync's messages carry new message ids (a new run), so downstream dedup keeps them.
    assert len({m["messageId"] for m in project.sent()}) == len(project.sent())


def test_computed_trait_changes_and_dropouts(project: Project,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(T0):
        sync(capsys, project, "score")
    first = project.sent()
    assert {m["userId"]: m["traits"]["score"] for m in first} == {f"u{i}": 20 for i in range(1, 6)}
    assert {m["context"]["personas"]["computation_class"] for m in first} == {"trait"}
    set_users(project.warehouse, [user("u1", 21.5), user("u2", None), user("u3"), user("u4")])
    with freeze_time(T0 + timedelta(hours=1)):
        run = by_key(sync(capsys, project, "score"))["score"]
    assert (run["entered"], run["exited"], run["changed"]) == (0, 2, 1)
    new = {m["userId"]: m["traits"]["score"] for m in project.sent()[len(first):]}
    assert new == {"u1": 21.5, "u2": None, "u5": None}
    code, out, _ = cli(capsys, "--config", str(project.path), "members", "score", "--json")
    assert {m["user_id"]: m["value"] for m in json.loads(out)} == \
        {"u1": 21.5, "u3": 20, "u4": 20}
    code, out, _ = cli(capsys, "--config", str(project.path), "members", "score", "--json",
                       "--at", (T0 + timedelta(minutes=30)).isoformat())
    assert {m["user_id"]: m["value"] for m in json.loads(out)} == {f"u{i}": 20 for i in range(1, 6)}
    code, out, _ = cli(capsys, "--config", str(project.path), "history", "score", "--json",
                       "--user", "u1")
    assert [(e["change"], e.get("value")) for e in json.loads(out)] == [("set", 20),
                                                                        ("set", 21.5)]
    code, out, _ = cli(capsys, "--config", str(project.path), "history", "score", "--json",
                       "--user", "u2")
    assert code == 0
    assert [e["change"] for e in json.loads(out)] == ["set", "exited"]


def test_members_at_and_history(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    times = [T0, T0 + timedelta(hours=2), T0 + timedelta(hours=4)]
    states = [
        [user("u1"), user("u2"), user("u3")],
        [user("u2"), user("u3"), user("u4")],
        [user("u1"), user("u2"), user("u4")],
    ]
    for at, users in zip(times, states, strict=True):
        set_users(project.warehouse, users)
        with freeze_time(at):
            assert sync(capsys, project, "high_scorers")["exit_code"] == 0

    def members_at(at: datetime | None) -> list[str]:
        args = ["--at", at.isoformat()] if at else []
        code, out, err = cli(capsys, "--config", str(project.path), "members", "high_scorers",
                             "--json", *args)
        assert code == 0, err
        return [m["user_id"] for m in json.loads(out)]

    assert members_at(T0 + timedelta(hours=1)) == ["u1", "u2", "u3"]
    assert members_at(T0 + timedelta(hours=3)) == ["u2", "u3", "u4"]
    assert members_at(times[1]) == ["u2", "u3", "u4"]  # at a run's clock: after that run
    assert members_at(T0 - timedelta(minutes=1)) == []
    assert members_at(None) == ["u1", "u2", "u4"]
    code, out, _ = cli(capsys, "--config", str(project.path), "history", "high_scorers",
                       "--json", "--user", "u1")
    events = [(e["change"], e["at"]) for e in json.loads(out)]
    assert events == [("entered", "2026-11-01T12:00:00Z"), ("exited", "2026-11-01T14:00:00Z"),
                      ("entered", "2026-11-01T16:00:00Z")]
    code, out, _ = cli(capsys, "--config", str(project.path), "history", "high_scorers",
                       "--json", "--since", (T0 + timedelta(hours=1)).isoformat())
    assert sorted((e["user_id"], e["change"]) for e in json.loads(out)) == [
        ("u1", "entered"), ("u1", "exited"), ("u3", "exited"), ("u4", "entered")]
    code, out, _ = cli(capsys, "--config", str(project.path), "runs", "high_scorers", "--json")
    assert code == 0
    assert [(r["kind"], r["members"]) for r in json.loads(out)] == [
        ("incremental", 3), ("incremental", 3), ("initial", 3)]


def snapshot_state(project: Project) -> dict[str, Any]:
    store = project.store()
    with store.read() as conn:
        state = {
            name: sorted(tuple(str(v) for v in row) for row in conn.execute(select(table)))
            for name, table in (("members", t.members), ("history", t.membership_history),
                                ("traits", t.trait_history), ("deliveries", t.deliveries))
        }
        state["computations"] = sorted(
            (r.key, r.member_count, r.initial_state) for r in conn.execute(
                select(t.computations)))
    store.dispose()
    return state


def test_source_failure_changes_nothing(project: Project,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(T0):
        sync(capsys, project)
    before = snapshot_state(project)
    db = sqlite3.connect(project.warehouse)
    db.execute("DROP TABLE users")
    db.commit()
    db.close()
    with freeze_time(T0 + timedelta(hours=2)):
        doc = sync(capsys, project)
    assert doc["exit_code"] == 1
    run = by_key(doc)["high_scorers"]
    assert run["status"] == "failed" and "no such table: users" in run["error"]
    assert snapshot_state(project) == before
    code, out, _ = cli(capsys, "--config", str(project.path), "runs", "high_scorers", "--json")
    assert code == 0
    assert json.loads(out)[0]["status"] == "failed"


def test_removal_guard_holds_then_force_applies(project: Project,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(T0):
        sync(capsys, project, "high_scorers")
    before = snapshot_state(project)
    set_users(project.warehouse, [])
    with freeze_time(T0 + timedelta(hours=2)):
        doc = sync(capsys, project, "high_scorers")
    run = by_key(doc)["high_scorers"]
    assert doc["exit_code"] == 3  # held by the guard, nothing failed
    assert run["status"] == "held" and "--force" in run["error"]
    assert snapshot_state(project) == before
    # Half the audience leaving (3 of 5 > 50%) is held too.
    set_users(project.warehouse, [user("u1"), user("u2")])
    with freeze_time(T0 + timedelta(hours=3)):
        run = by_key(sync(capsys, project, "high_scorers"))["high_scorers"]
    assert run["status"] == "held" and "would remove 3 of 5" in run["error"]
    with freeze_time(T0 + timedelta(hours=4)):
        forced = sync(capsys, project, "high_scorers", "--force")
    run = by_key(forced)["high_scorers"]
    assert forced["exit_code"] == 0 and (run["status"], run["exited"]) == ("succeeded", 3)
    assert sorted(m["userId"] for m in project.sent() if m["traits"]["high_scorers"] is False) \
        == ["u3", "u4", "u5"]


def test_bad_rows_counted_by_reason(project: Project,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    set_users(project.warehouse, [
        user("u1"), user(None), user(""), user("   "), user("x" * 256), user("u1"), user("u2"),
        user(42),
    ])
    with freeze_time(T0):
        doc = sync(capsys, project, "high_scorers")
    run = by_key(doc)["high_scorers"]
    assert doc["exit_code"] == 0
    assert run["skipped"] == {"null": 1, "empty": 2, "too_long": 1, "duplicate": 1,
                              "bad_type": 0, "non_finite": 0}
    assert run["members"] == 3
    code, out, _ = cli(capsys, "--config", str(project.path), "members", "high_scorers",
                       "--json")
    assert code == 0
    assert [m["user_id"] for m in json.loads(out)] == ["42", "u1", "u2"]


def test_repeated_ids_in_a_later_run(project: Project,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Repeated ids of members, of new users and of changed ones: each counted once, and
    only the membership changes sent (PostgreSQL finds them after loading an unkeyed stage)."""
    with freeze_time(T0):
        assert sync(capsys, project, "high_scorers")["exit_code"] == 0
    set_users(project.warehouse, [
        user("u1"), user("u1"), user("u2", email="new@example.com"),
        user("u2", email="new@example.com"), user("u3"), user("u4"), user("u6"), user("u6"),
    ])
    sent_before = len(project.sent())
    with freeze_time(T0 + timedelta(hours=3)):
        doc = sync(capsys, project, "high_scorers")
    run = by_key(doc)["high_scorers"]
    assert doc["exit_code"] == 0, doc
    assert (run["members"], run["entered"], run["exited"], run["changed"]) == (5, 1, 1, 0)
    assert run["skipped"]["duplicate"] == 3
    changes = {(m["userId"], m["traits"]["high_scorers"], m["traits"]["email"])
               for m in project.sent()[sent_before:]}
    assert changes == {("u6", True, "u6@example.com"), ("u5", False, "u5@example.com")}


def test_dry_run_writes_nothing(project: Project, capsys: pytest.CaptureFixture[str]) -> None:
    # Not even the schema: a dry run against no state database says what to do, and stops.
    code, out, err = cli(capsys, "--config", str(project.path), "sync", "--dry-run")
    assert code == 2 and "run `audience-sync db upgrade`" in err, err
    assert cli(capsys, "--config", str(project.path), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(project.path), "sync", "--dry-run")
    assert code == 0, err
    assert "initial plan" in out and "would enter: u1, u2, u3, u4, u5" in out
    assert project.count(t.runs) == 0 and project.count(t.computations) == 0
    with freeze_time(T0):
        sync(capsys, project)
    before = snapshot_state(project)
    runs_before = project.count(t.runs)
    set_users(project.warehouse, [user("u1"), user("u2"), user("u3"), user("u9")])
    code, out, _ = cli(capsys, "--config", str(project.path), "sync", "high_scorers",
                       "--dry-run", "--json")
    plan = json.loads(out)["runs"][0]
    assert (plan["status"], plan["entered"], plan["exited"]) == ("planned", 1, 2)
    assert plan["sample_exited"] == ["u4", "u5"]
    assert snapshot_state(project) == before and project.count(t.runs) == runs_before
    assert not project.out.with_suffix(".tmp").exists()


def test_unknown_audience_is_usage_error(project: Project,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--config", str(project.path), "sync", "nope")
    assert code == 2 and "unknown audience 'nope'" in err
    code, _, err = cli(capsys, "--config", str(project.path), "members", "high_scorers",
                       "--at", "yesterday")
    assert code == 2 and "--at: 'yesterday' is not an ISO-8601 time" in err


def test_pending_delivery_superseded_by_newer_change(project: Project) -> None:
    """A member who flips before the drain: only the newest value stays pending."""
    config = project.config
    store = project.store()
    store.register(config.computations, T0)
    comp = config.find("high_scorers")
    run_computation(store, config, comp, clock=lambda: T0)
    set_users(project.warehouse, [user(f"u{i}") for i in range(2, 6)])
    run_computation(store, config, comp, clock=lambda: T0 + timedelta(hours=1))
    set_users(project.warehouse, [user(f"u{i}") for i in range(1, 6)])
    run_computation(store, config, comp, clock=lambda: T0 + timedelta(hours=2))
    d = t.deliveries
    with store.read() as conn:
        rows = conn.execute(select(d.c.value, d.c.status, d.c.run_id)
                            .where(d.c.user_id == "u1").order_by(d.c.id)).all()
    assert [(r.value, r.status) for r in rows] == [
        ("true", "superseded"), ("false", "superseded"), ("true", "pending")]
    with store.read() as conn:
        others = conn.execute(select(d.c.status, func.count()).where(d.c.user_id != "u1")
                              .group_by(d.c.status)).all()
    assert dict(others) == {"pending": 4}  # the users who did not change keep theirs
    store.dispose()


def test_rule_audience_window_edge(tmp_path: Path, state_url: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A member whose last qualifying event leaves the window drops out on the next run."""
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse, users=[user("a"), user("b"), user("c")], tracks=[
        ("a", "Order Completed", "2026-11-01T00:00:00Z"),
        ("b", "Order Completed", "2026-11-20 08:30:00"),
        ("b", "Order Completed", "2026-11-21T08:30:00.000+00:00"),
        ("c", "Page Viewed", "2026-11-25T00:00:00Z"),
    ])
    doc = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [
            {"name": "Buyers 30d", "source": "w", "destinations": ["file"],
             "rule": {"event": "Order Completed", "within": "30d"}},
            {"name": "Repeat Buyers", "source": "w", "destinations": ["file"],
             "rule": {"event": "Order Completed", "within": "30d", "at_least": 2}},
            {"name": "No Orders 10d", "source": "w", "destinations": ["file"],
             "rule": {"event": "Order Completed", "within": "10d", "not_performed": True}},
        ],
    }
    path = write_config(tmp_path / "config.yaml", doc)

    def members(key: str) -> list[str]:
        code, out, err = cli(capsys, "--config", str(path), "members", key, "--json")
        assert code == 0, err
        return [m["user_id"] for m in json.loads(out)]

    # a's order is exactly 30 days old minus one second: still inside the window.
    with freeze_time("2026-11-30T23:59:59Z"):
        code, _, err = cli(capsys, "--config", str(path), "sync", "--force")
        assert code == 0, err
    assert members("buyers_30d") == ["a", "b"]
    assert members("repeat_buyers") == ["b"]
    assert members("no_orders_10d") == ["a", "c"]
    first = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert next(m for m in first if m["userId"] == "a")["traits"]["email"] == "a@example.com"
    # One second later it is exactly 30 days old: out of the window, sent false.
    with freeze_time("2026-12-01T00:00:00Z"):
        code, out, err = cli(capsys, "--config", str(path), "sync", "buyers_30d", "--json",
                             "--force")
        assert code == 0, err
    run = json.loads(out)["runs"][0]
    assert (run["exited"], run["sample_exited"]) == (1, ["a"])
    last = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[-1])
    assert (last["userId"], last["traits"]["buyers_30d"]) == ("a", False)
    assert members("buyers_30d") == ["b"]


def test_same_database_source_uses_insert_select(tmp_path: Path, state_url: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """When the source is the state database, the snapshot never passes through Python."""
    store = Store(state_url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE app_users (id INTEGER, email TEXT, score INTEGER)")
        conn.exec_driver_sql(
            "INSERT INTO app_users VALUES (1, 'a@x.io', 5), (2, 'b@x.io', 50), "
            "(3, NULL, 70), (NULL, 'n@x.io', 90), (2, 'dup@x.io', 60)")
    store.dispose()
    doc = {
        "state_db": state_url,
        "sources": {"app": {"url": state_url}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": "Engaged", "source": "app", "destinations": ["file"],
                       "query": "SELECT id AS user_id, email FROM app_users WHERE score > 10"}],
        "computed_traits": [{"name": "App Score", "source": "app", "destinations": ["file"],
                             "query": "SELECT id AS user_id, score AS value FROM app_users"}],
    }
    path = write_config(tmp_path / "config.yaml", doc)
    code, out, err = cli(capsys, "--config", str(path), "sync", "--json")
    assert code == 0, err
    runs = by_key(json.loads(out))
    assert runs["engaged"]["members"] == 2
    assert runs["engaged"]["skipped"] == {"null": 1, "empty": 0, "too_long": 0, "duplicate": 1,
                                          "bad_type": 0, "non_finite": 0}
    sent = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {(m["userId"], m["traits"].get("email")) for m in sent if "engaged" in m["traits"]} \
        == {("2", "b@x.io"), ("3", None)}
    assert {m["userId"]: m["traits"]["app_score"] for m in sent if "app_score" in m["traits"]} \
        == {"1": 5, "2": 50, "3": 70}
    code, out, _ = cli(capsys, "--config", str(path), "sync", "--json")
    assert all(run["queued"] == 0 for run in json.loads(out)["runs"])


def test_ids_only_audience_then_traits_added(tmp_path: Path, state_url: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An ids-only audience, then traits added to its query: nobody is re-sent for them;
    they travel with the next membership change."""
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse, users=[user(f"u{i}") for i in range(1, 5)])
    doc: dict[str, Any] = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": "Ids", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id FROM users WHERE score > 10"}],
    }
    path = write_config(tmp_path / "config.yaml", doc)

    def run() -> dict[str, Any]:
        code, out, err = cli(capsys, "--config", str(path), "sync", "--json")
        assert code == 0, err
        result: dict[str, Any] = json.loads(out)["runs"][0]
        return result

    assert run()["entered"] == 4
    set_users(warehouse, [user("u1"), user("u2"), user("u3", 1), user("u5")])
    second = run()
    assert (second["entered"], second["exited"], second["changed"]) == (1, 2, 0)
    doc["audiences"][0]["query"] = "SELECT id AS user_id, email FROM users WHERE score > 10"
    write_config(path, doc)
    third = run()
    assert (third["entered"], third["exited"], third["changed"], third["queued"]) == \
        (0, 0, 0, 0)
    set_users(warehouse, [user("u1"), user("u2"), user("u5"), user("u6")])
    fourth = run()
    assert (fourth["entered"], fourth["queued"]) == (1, 1)
    sent = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (sent[-1]["userId"], sent[-1]["traits"].get("email")) == ("u6", "u6@example.com")
    assert run()["queued"] == 0
