"""Sources: time zones, hostile values and ids, read-only SQLite, and definitions whose
source lost what they use."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from audience_sync.sources import SkipCounts, _json_values, create_source_engine
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.conftest import drop_pg_schema, new_pg_schema
from tests.helpers import cli, make_warehouse, set_users, write_config

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def user(uid: Any, email: str | None = None) -> tuple[Any, ...]:
    return (uid, email or f"{uid}@example.com", f"Name {uid}", "CTO", "c1", 20)


def sync(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> dict[str, Any]:
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json", *args)
    doc: dict[str, Any] = json.loads(out)
    doc["exit_code"], doc["stderr"] = code, err
    doc["by_key"] = {run["key"]: run for run in doc["runs"]}
    return doc


def members(capsys: pytest.CaptureFixture[str], config: Path, key: str) -> list[str]:
    code, out, err = cli(capsys, "--config", str(config), "members", key, "--json")
    assert code == 0, err
    return [m["user_id"] for m in json.loads(out)]


def sent(path: Path) -> list[dict[str, Any]]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    if not path.exists():
        return []
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def store_state(state_url: str) -> dict[str, Any]:
    store = Store(state_url)
    with store.read() as conn:
        state = {name: sorted(tuple(str(v) for v in row) for row in conn.execute(select(table)))
                 for name, table in (("members", t.members), ("history", t.membership_history),
                                     ("deliveries", t.deliveries))}
    store.dispose()
    return state


# -- item 5: naive timestamps are UTC ----------------------------------------------------------

@pytest.fixture
def new_york_source(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL source whose sessions run in America/New_York (a role's default)."""
    schema, _ = new_pg_schema(pg_admin_url)
    role = f"tz_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg_admin_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"ALTER ROLE {role} SET TimeZone = 'America/New_York'"))
        conn.execute(text(f"ALTER ROLE {role} SET search_path = {schema}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA {schema} TO {role}"))
        conn.execute(text(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} "
                          f"GRANT SELECT ON TABLES TO {role}"))
    url = make_url(pg_admin_url).set(username=role, password=None) \
        .render_as_string(hide_password=False)
    try:
        yield url, schema
    finally:
        drop_pg_schema(pg_admin_url, schema)
        with admin.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def test_rule_reads_naive_timestamps_as_utc_whatever_the_session_zone(
        tmp_path: Path, state_url: str, pg_admin_url: str,
        new_york_source: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """An order 26 h old is outside a 1-day window and one 3 h old inside, for naive,
    timestamptz and text columns, although the source's session runs in New York."""
    source_url, schema = new_york_source
    old, recent = NOW - timedelta(hours=26), NOW - timedelta(hours=3)
    wall = "%Y-%m-%dT%H:%M:%S"
    admin = create_engine(pg_admin_url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE TABLE {schema}.users (id TEXT, email TEXT)"))
        conn.execute(text(f"CREATE TABLE {schema}.tracks (user_id TEXT, event TEXT, "
                          "ts_naive TIMESTAMP, ts_tz TIMESTAMPTZ, ts_text TEXT)"))
        conn.execute(text(f"INSERT INTO {schema}.users VALUES ('old', 'o@x.io'), "
                          "('recent', 'r@x.io'), ('offset', 'f@x.io')"))
        rows = [("old", old, old.strftime(wall)), ("recent", recent, recent.strftime(wall)),
                # The same instant as `recent`, written as New York's wall time and offset.
                ("offset", recent, (recent - timedelta(hours=5)).strftime(wall) + "-05:00")]
        for uid, at, spelled in rows:
            conn.execute(text(f"INSERT INTO {schema}.tracks VALUES (:u, 'Order Completed', "
                              ":naive, :aware, :spelled)"),
                         {"u": uid, "naive": at.replace(tzinfo=None), "aware": at,
                          "spelled": spelled})
    admin.dispose()
    engine = create_source_engine(source_url)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW TimeZone")).scalar_one() == "America/New_York"
    engine.dispose()
    kinds = ("naive", "tz", "text")
    doc = {
        "state_db": state_url,
        "sources": {kind: {"url": source_url, "columns": {"timestamp": f"ts_{kind}"}}
                    for kind in kinds},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": f"Buyers {kind}", "source": kind, "destinations": ["file"],
                       "rule": {"event": "Order Completed", "within": "1d"}} for kind in kinds],
    }
    config = write_config(tmp_path / "config.yaml", doc)
    with freeze_time(NOW):
        result = sync(capsys, config)
    assert result["exit_code"] == 0, result
    for kind in kinds:
        assert members(capsys, config, f"buyers_{kind}") == ["offset", "recent"], kind


# -- item 6: NaN and infinities ---------------------------------------------------------------

def _trait_config(tmp_path: Path, state_url: str, sources: dict[str, str],
                  queries: dict[str, str]) -> Path:
    doc = {
        "state_db": state_url,
        "sources": {name: {"url": url} for name, url in sources.items()},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "computed_traits": [{"name": name, "source": name, "destinations": ["file"],
                             "query": query} for name, query in queries.items()],
    }
    return write_config(tmp_path / "config.yaml", doc)


def test_non_finite_trait_values_are_skipped_and_counted(
        tmp_path: Path, state_url: str, pg_admin_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """NaN and infinities are neither stored nor sent (a bare NaN is invalid JSON and fails
    the other users' calls of the batch); each is counted, streamed or same-database."""
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse)
    rows = "('u1', {nan}), ('u2', {inf}), ('u3', {ninf}), ('u4', 1.5)"
    pg_values = rows.format(nan="'NaN'::float8", inf="'Infinity'::float8",
                            ninf="'-Infinity'::numeric")
    pg_query = f"SELECT * FROM (VALUES {pg_values}) AS v(user_id, value)"
    numeric = rows.format(nan="'NaN'::numeric", inf="'Infinity'::numeric",
                          ninf="'-Infinity'::numeric")
    pg_numeric = f"SELECT * FROM (VALUES {numeric}) AS v(user_id, value)"
    sqlite_query = ("SELECT column1 AS user_id, column2 AS value FROM (VALUES "
                    + rows.format(nan="NULL", inf="1e999", ninf="-1e999") + ")")
    same_db = pg_query if state_url.startswith("postgresql") else sqlite_query
    config = _trait_config(
        tmp_path, state_url,
        {"lite": f"sqlite:///{warehouse}", "pg": pg_admin_url, "pgnum": pg_admin_url,
         "same": state_url},
        {"lite": sqlite_query, "pg": pg_query, "pgnum": pg_numeric, "same": same_db})
    result = sync(capsys, config)
    assert result["exit_code"] == 0, result
    skipped = {key: run["skipped"]["non_finite"] for key, run in result["by_key"].items()}
    # SQLite stores no NaN (u1 is a null value there, and a null is a value).
    expected_same = 3 if state_url.startswith("postgresql") else 2
    assert skipped == {"lite": 2, "pg": 3, "pgnum": 3, "same": expected_same}
    values = {(m["userId"], k, v) for m in sent(tmp_path / "out.jsonl")
              for k, v in m["traits"].items()}
    assert {("u4", key, 1.5) for key in ("lite", "pg", "pgnum", "same")} <= values
    assert not {(u, k) for u, k, _ in values if u in ("u2", "u3")}
    assert members(capsys, config, "pg") == members(capsys, config, "pgnum") == ["u4"]
    # The plain summary says so too.
    code, out, _ = cli(capsys, "--config", str(config), "sync", "pg")
    assert code == 0 and "non finite 3" in out


# -- item 13: only membership changes cause an audience's calls --------------------------------

def test_audience_contact_trait_change_alone_sends_nothing(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse, users=[user(f"u{i}") for i in range(1, 5)])
    doc: dict[str, Any] = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": "All", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id, email, name, title FROM users"}],
    }
    config = write_config(tmp_path / "config.yaml", doc)
    out = tmp_path / "out.jsonl"
    assert sync(capsys, config)["by_key"]["all"]["queued"] == 4
    # Every email and title changes: no call.
    set_users(warehouse, [(f"u{i}", f"new{i}@x.io", f"Name u{i}", "CEO", "c1", 20)
                          for i in range(1, 5)])
    run = sync(capsys, config)["by_key"]["all"]
    assert (run["changed"], run["queued"]) == (0, 0)
    # The query no longer returns email (nor name, title): no call either.
    doc["audiences"][0]["query"] = "SELECT id AS user_id FROM users"
    write_config(config, doc)
    run = sync(capsys, config)["by_key"]["all"]
    assert (run["changed"], run["queued"]) == (0, 0)
    assert len(sent(out)) == 4
    # A membership change is sent, with the traits it has; a leaver's call carries the
    # traits it was last sent with.
    doc["audiences"][0]["query"] = "SELECT id AS user_id, email FROM users WHERE id <> 'u1'"
    write_config(config, doc)
    set_users(warehouse, [(f"u{i}", f"new{i}@x.io", f"Name u{i}", "CEO", "c1", 20)
                          for i in range(1, 6)])
    run = sync(capsys, config)["by_key"]["all"]
    assert (run["entered"], run["exited"], run["changed"], run["queued"]) == (1, 1, 0, 2)
    calls = {m["userId"]: m["traits"] for m in sent(out)[4:]}
    assert calls == {"u5": {"all": True, "email": "new5@x.io"},
                     "u1": {"all": False, "email": "u1@example.com", "name": "Name u1",
                            "title": "CTO"}}


def test_rule_audience_without_users_table_fails_and_changes_nothing(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse, users=[user("a"), user("b")], tracks=[
        ("a", "Order Completed", "2026-11-30T10:00:00Z"),
        ("b", "Order Completed", "2026-11-30T11:00:00Z")])
    doc = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [
            {"name": "Buyers", "source": "w", "destinations": ["file"],
             "rule": {"event": "Order Completed", "within": "1d"}},
            {"name": "Titled", "source": "w", "destinations": ["file"],
             "query": "SELECT user_id, title FROM tracks JOIN users ON users.id = user_id"},
        ],
    }
    config = write_config(tmp_path / "config.yaml", doc)
    with freeze_time(NOW):
        assert sync(capsys, config)["exit_code"] == 0
    before = store_state(state_url)
    db = sqlite3.connect(warehouse)
    db.execute("ALTER TABLE users DROP COLUMN title")
    db.commit()
    with freeze_time(NOW + timedelta(hours=1)):
        result = sync(capsys, config)
    runs = result["by_key"]
    assert runs["titled"]["status"] == "failed" and "title" in runs["titled"]["error"]
    assert runs["buyers"]["status"] == "succeeded" and runs["buyers"]["queued"] == 0
    assert store_state(state_url) == before
    db.execute("ALTER TABLE users RENAME TO people")
    db.commit()
    db.close()
    with freeze_time(NOW + timedelta(hours=2)):
        result = sync(capsys, config, "buyers")
    run = result["by_key"]["buyers"]
    assert result["exit_code"] == 1
    assert run["status"] == "failed" and "no table 'users'" in run["error"], run
    assert store_state(state_url) == before


# -- items 17, 18: read-only SQLite sources, paths as URIs ------------------------------------

def _one_audience(tmp_path: Path, state_url: str, source_url: str, query: str) -> Path:
    return write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": source_url}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": "A", "source": "w", "destinations": ["file"], "query": query}],
    })


@pytest.mark.parametrize("statement", [
    "VACUUM INTO '{target}'",
    "ATTACH DATABASE '{target}' AS other",
    "CREATE TEMP TABLE t AS SELECT 1 AS user_id",
    "PRAGMA journal_mode = DELETE",
    "DELETE FROM users RETURNING id AS user_id",
])
def test_read_only_sqlite_source_refuses_every_write(
        tmp_path: Path, state_url: str, statement: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse, users=[user("u1")])
    target = tmp_path / "copy.db"
    before = warehouse.read_bytes()
    config = _one_audience(tmp_path, state_url, f"sqlite:///{warehouse}",
                           statement.format(target=target))
    result = sync(capsys, config)
    run = result["by_key"]["a"]
    assert result["exit_code"] == 1
    assert run["status"] == "failed" and "read-only" in run["error"], run
    assert not target.exists()
    assert warehouse.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("w.db")) == ["w.db"]


def test_read_only_sqlite_source_still_reads(tmp_path: Path) -> None:
    """Recursive CTEs, functions and reflection (its PRAGMAs) stay allowed."""
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse, users=[user("u1")])
    engine = create_source_engine(f"sqlite:///{warehouse}")
    with engine.connect() as conn:
        assert conn.execute(text(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) "
            "SELECT group_concat(i) FROM n")).scalar_one() == "1,2,3"
        assert [r[1] for r in conn.execute(text("PRAGMA table_info(users)"))][:2] == \
            ["id", "email"]
    engine.dispose()


@pytest.mark.parametrize("name", ["db%41.db", "db#1.db", "db 1.db", "db%3F.db"])
def test_sqlite_source_path_is_escaped_into_its_uri(tmp_path: Path, name: str) -> None:
    """`%41` names those three characters, not `A`; `#` starts no fragment."""
    make_warehouse(tmp_path / name, users=[user("right")])
    make_warehouse(tmp_path / "dbA.db", users=[user("wrong")])
    make_warehouse(tmp_path / "db", users=[user("wrong")])
    make_warehouse(tmp_path / "db?.db", users=[user("wrong")])
    engine = create_source_engine(f"sqlite:///{tmp_path / name}")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM users")).scalars().all() == ["right"]
    engine.dispose()


def test_sqlite_source_missing_file_is_not_created(tmp_path: Path) -> None:
    engine = create_source_engine(f"sqlite:///{tmp_path / 'nope#.db'}")
    with pytest.raises(Exception, match="unable to open database file"), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    engine.dispose()
    assert list(tmp_path.iterdir()) == []


# -- item 21: ids that are not text nor integers ----------------------------------------------

def test_blob_and_fractional_user_ids_are_skipped_and_counted(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse)
    db = sqlite3.connect(warehouse)
    db.execute("CREATE TABLE ids (id)")  # no affinity: each value keeps its own type
    db.executemany("INSERT INTO ids VALUES (?)", [(b"blob",), (1.5,), (7.0,), (42,), ("u1",)])
    db.commit()
    db.close()
    store = Store(state_url)
    pg = store.dialect == "postgresql"
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE app_users (id NUMERIC)" if pg
                             else "CREATE TABLE app_users (id)")
        conn.exec_driver_sql("INSERT INTO app_users VALUES (1.5), (7.0), (42)")
        if pg:
            conn.exec_driver_sql("CREATE TABLE app_blobs (id BYTEA)")
            conn.exec_driver_sql("INSERT INTO app_blobs VALUES ('blob'::bytea)")
        else:
            conn.exec_driver_sql("INSERT INTO app_users VALUES (x'626c6f62')")
    store.dispose()
    config = write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}, "same": {"url": state_url}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [
            {"name": "Streamed", "source": "w", "destinations": ["file"],
             "query": "SELECT id AS user_id FROM ids"},
            {"name": "Same", "source": "same", "destinations": ["file"],
             "query": "SELECT id AS user_id FROM app_users"},
            *([{"name": "Blobs", "source": "same", "destinations": ["file"],
                "query": "SELECT id AS user_id FROM app_blobs"}] if pg else []),
        ],
    })
    result = sync(capsys, config)
    assert result["exit_code"] == 0, result
    runs = result["by_key"]
    assert runs["streamed"]["skipped"]["bad_type"] == 2
    assert members(capsys, config, "streamed") == ["42", "7", "u1"]
    assert runs["same"]["skipped"]["bad_type"] == (1 if pg else 2)
    assert members(capsys, config, "same") == ["42", "7"]
    if pg:
        assert (runs["blobs"]["skipped"]["bad_type"], runs["blobs"]["members"]) == (1, 0)
    assert not any("b'" in m["userId"] for m in sent(tmp_path / "out.jsonl"))


def test_non_finite_values_nested_in_a_trait_are_refused() -> None:
    """An array or JSON value holding a NaN is as unsendable as a bare one."""
    skipped = SkipCounts()
    rows = [("a", [1.0, float("nan")]), ("b", {"x": float("-inf")}), ("c", Decimal("NaN")),
            ("d", [1.0, 2.5]), ("e", None)]
    assert _json_values(rows, skipped) == [("d", "[1,2.5]"), ("e", "null")]
    assert (skipped.non_finite, skipped.total) == (3, 3)
