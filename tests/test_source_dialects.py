"""Sources as users have them: a PostgreSQL URL's own options kept, schema-qualified Segment
tables, and DuckDB (a columnar warehouse dialect) end to end, always read-only."""

from __future__ import annotations

import hashlib
import importlib
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.helpers import cli, write_config

ROOT = Path(__file__).resolve().parent.parent
duckdb = pytest.importorskip("duckdb", reason="the duckdb extra is part of dev")


def _sent(out: Path) -> dict[str, set[str]]:
    """audience key -> user ids sent `true`, from a jsonl destination's file."""
    members: dict[str, set[str]] = {}
    if not out.exists():
        return members
    for line in out.read_text().splitlines():
        message = json.loads(line)
        key = message["context"]["personas"]["computation_key"]
        if message["traits"].get(key) is True:
            members.setdefault(key, set()).add(message["userId"])
    return members


def _config(tmp_path: Path, source: dict[str, Any], audiences: list[dict[str, Any]]) -> Path:
    return write_config(tmp_path / "config.yaml", {
        "state_db": f"sqlite:///{tmp_path / 'state.db'}",
        "sources": {"w": source},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"source": "w", "destinations": ["file"], **a} for a in audiences],
    })


NOW = datetime.now(UTC).replace(microsecond=0)
RECENT, OLD = NOW - timedelta(hours=3), NOW - timedelta(hours=26)
ORDERS_LAST_DAY = {"name": "Ordered Today", "key": "ordered_today",
                   "rule": {"event": "Order Completed", "within": "1d"}}
RICH = {"name": "Rich", "key": "rich",
        "query": "SELECT id AS user_id, email FROM users WHERE score > 10"}


# -- PostgreSQL: the URL's options, a schema per source ------------------------------------------

@pytest.fixture
def pg_warehouse(pg_admin_url: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL schema holding Segment's tables (naive timestamps, meaning UTC), and the
    admin URL; dropped afterwards."""
    schema = f"wh_{uuid.uuid4().hex[:10]}"
    engine = create_engine(pg_admin_url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE TABLE {schema}.users (id text, email text, score float)"))
        conn.execute(text(f"CREATE SEQUENCE {schema}.hits"))
        conn.execute(text(f"CREATE TABLE {schema}.tracks "
                          "(user_id text, event text, timestamp timestamp)"))
        conn.execute(text(f"INSERT INTO {schema}.users VALUES ('a', 'a@x.io', 50), "
                          "('b', 'b@x.io', 5), ('c', 'c@x.io', 20)"))
        conn.execute(text(f"INSERT INTO {schema}.tracks VALUES (:u, 'Order Completed', :t)"),
                     [{"u": "a", "t": RECENT.replace(tzinfo=None)},
                      {"u": "b", "t": OLD.replace(tzinfo=None)}])
    try:
        yield schema, pg_admin_url
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def _with_options(url: str, options: str) -> str:
    return make_url(url).update_query_dict({"options": options}) \
        .render_as_string(hide_password=False)


def test_postgres_source_keeps_the_search_path_of_its_url_options(
        pg_warehouse: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema, admin = pg_warehouse
    url = _with_options(admin, f"-csearch_path={schema}")
    assert "options=-csearch_path%3D" in url
    config = _config(tmp_path, {"url": url}, [ORDERS_LAST_DAY, RICH])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert _sent(tmp_path / "out.jsonl") == {"ordered_today": {"a"}, "rich": {"a", "c"}}


def test_postgres_source_schema_setting_qualifies_segment_tables(
        pg_warehouse: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema, admin = pg_warehouse
    config = _config(tmp_path, {"url": admin, "schema": schema}, [ORDERS_LAST_DAY])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert _sent(tmp_path / "out.jsonl") == {"ordered_today": {"a"}}


def test_postgres_source_tables_may_name_their_schema(
        pg_warehouse: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema, admin = pg_warehouse
    source = {"url": admin, "tables": {"tracks": f"{schema}.tracks", "users": f"{schema}.users"}}
    config = _config(tmp_path, source, [ORDERS_LAST_DAY])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert _sent(tmp_path / "out.jsonl") == {"ordered_today": {"a"}}


def test_postgres_source_with_url_options_is_still_read_only(
        pg_warehouse: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema, admin = pg_warehouse
    url = _with_options(admin, f"-csearch_path={schema} -cstatement_timeout=60000")
    # A write hidden in a SELECT (a data-modifying WITH cannot be: cursors refuse it).
    writer = {"name": "Writer", "key": "writer",
              "query": "SELECT id AS user_id FROM users WHERE nextval('hits') > 0"}
    config = _config(tmp_path, {"url": url}, [writer])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 1
    assert "read-only" in (out + err)
    engine = create_engine(admin)
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT is_called FROM {schema}.hits")).scalar_one() is False
    engine.dispose()
    assert not (tmp_path / "out.jsonl").exists() or _sent(tmp_path / "out.jsonl") == {}


# -- DuckDB ------------------------------------------------------------------------------------

def _duckdb_warehouse(path: Path, ts_type: str, schema: str | None = None) -> str:
    prefix = f"{schema}." if schema else ""
    db = duckdb.connect(str(path))
    if schema:
        db.execute(f"CREATE SCHEMA {schema}")
    db.execute(f"CREATE TABLE {prefix}users (id TEXT, email TEXT, score DOUBLE)")
    db.execute(f"CREATE TABLE {prefix}tracks (user_id TEXT, event TEXT, timestamp {ts_type})")
    db.execute(f"INSERT INTO {prefix}users VALUES ('a', 'a@x.io', 50), ('b', 'b@x.io', 5), "
               "('c', 'c@x.io', 20)")

    def spelled(at: datetime) -> object:
        if ts_type == "TEXT":
            return at.strftime("%Y-%m-%dT%H:%M:%SZ")
        return at if ts_type == "TIMESTAMPTZ" else at.replace(tzinfo=None)

    db.executemany(f"INSERT INTO {prefix}tracks VALUES (?, 'Order Completed', ?)",
                   [("a", spelled(RECENT)), ("b", spelled(OLD)),
                    ("c", spelled(NOW + timedelta(hours=5)))])  # the future is not "within"
    db.close()
    return f"duckdb:///{path}"


@pytest.mark.parametrize("ts_type", ["TIMESTAMP", "TIMESTAMPTZ", "TEXT"])
def test_duckdb_source_runs_rule_and_query_audiences(
        ts_type: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _duckdb_warehouse(tmp_path / "w.duckdb", ts_type)
    config = _config(tmp_path, {"url": url}, [ORDERS_LAST_DAY, RICH])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert _sent(tmp_path / "out.jsonl") == {"ordered_today": {"a"}, "rich": {"a", "c"}}


def test_duckdb_source_schema_setting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _duckdb_warehouse(tmp_path / "w.duckdb", "TIMESTAMP", schema="analytics")
    config = _config(tmp_path, {"url": url, "schema": "analytics"}, [ORDERS_LAST_DAY])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert _sent(tmp_path / "out.jsonl") == {"ordered_today": {"a"}}


@pytest.mark.parametrize("query", [
    "WITH w AS (SELECT 1) SELECT id AS user_id FROM users; CREATE TABLE evil (a INT)",
    "SELECT id AS user_id FROM users, read_csv('{outside}')",
    "SELECT id AS user_id FROM users WHERE (SELECT count(*) FROM glob('{outside}')) >= 0",
])
def test_duckdb_source_refuses_writes_and_files_outside(
        query: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    warehouse = tmp_path / "w.duckdb"
    url = _duckdb_warehouse(warehouse, "TIMESTAMP")
    outside = tmp_path / "outside.csv"
    outside.write_text("id\nx\n")
    audience = {"name": "Evil", "key": "evil", "query": query.format(outside=outside)}
    config = _config(tmp_path, {"url": url}, [audience])
    before = warehouse.read_bytes()
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 1, out + err
    assert "Traceback" not in out + err
    assert warehouse.read_bytes() == before
    assert _sent(tmp_path / "out.jsonl") == {}


def test_demo_audiences_agree_on_sqlite_and_duckdb(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo warehouse written both ways gives the same members for every demo audience of
    users, and the same accounts; the demo's account audience (its SQL is SQLite's) has
    members."""
    demo = yaml.safe_load((ROOT / "config.yaml").read_text())
    audiences = [a for a in demo["audiences"] if a.get("level", "user") == "user"]
    accounts = [a for a in demo["audiences"] if a.get("level") == "account"]
    assert audiences and accounts
    results = []
    for name in ("w.db", "w.duckdb"):
        subprocess.run([sys.executable, str(ROOT / "demo" / "make_warehouse.py"),
                        str(tmp_path / name)], check=True, capture_output=True)
        run_dir = tmp_path / name.replace(".", "_")
        prefix = "duckdb" if name.endswith("duckdb") else "sqlite"
        config = _config(run_dir, {"url": f"{prefix}:///{tmp_path / name}"},
                         [{k: v for k, v in a.items() if k != "source"} for a in audiences])
        code, out, err = cli(capsys, "--config", str(config), "sync")
        assert code == 0, out + err
        results.append(_sent(run_dir / "out.jsonl"))
    sqlite_members, duckdb_members = results
    assert len(sqlite_members) == len(audiences)  # every demo audience has members
    assert duckdb_members == sqlite_members
    with closing(sqlite3.connect(tmp_path / "w.db")) as db:
        sqlite_accounts = db.execute("SELECT * FROM accounts ORDER BY id").fetchall()
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as db:
        duckdb_accounts = db.execute(
            "SELECT id, name, plan, employees, strftime(created_at, '%Y-%m-%dT%H:%M:%SZ') "
            "FROM accounts ORDER BY id").fetchall()
    assert len(sqlite_accounts) == 400 and duckdb_accounts == sqlite_accounts
    config = _config(tmp_path / "accounts", {"url": f"sqlite:///{tmp_path / 'w.db'}"},
                     [{k: v for k, v in a.items() if k != "source"} for a in accounts])
    for audience in accounts:
        code, out, err = cli(capsys, "--config", str(config), "preview", audience["name"],
                             "--json")
        assert code == 0, out + err
        preview = json.loads(out)
        assert 0 < preview["count"] < 400, preview
        assert all(row["group_id"].startswith("c") for row in preview["sample"])


# Digests of the demo's users and events for a fixed day, from make_warehouse.py as it was before
# the accounts table (commit ae21b1e): existing demo audiences must keep their members.
DEMO_DAY = datetime(2026, 11, 28, tzinfo=UTC)
DEMO_USERS_SHA256 = "cb20c35883ea0277df041a100e1eb8882939ab1d40f8cbf5c0326c4da0358b8f"
DEMO_EVENTS_SHA256 = "7cc444500d16de61f0e33dd843e5c6c5890fd7d24f167d3ffb1c694ff62cbcfe"


def _digest(rows: list[tuple[object, ...]]) -> str:
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def test_demo_warehouse_gains_accounts_and_keeps_its_users(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "demo"))
    make_warehouse = importlib.import_module("make_warehouse")
    users, events = make_warehouse.generate(DEMO_DAY)
    assert (_digest(users), _digest(events)) == (DEMO_USERS_SHA256, DEMO_EVENTS_SHA256)
    make_warehouse.build(tmp_path / "w.db", DEMO_DAY)
    with closing(sqlite3.connect(tmp_path / "w.db")) as db:
        assert db.execute("SELECT * FROM users ORDER BY id").fetchall() == users
        assert db.execute("SELECT user_id, event, timestamp FROM tracks ORDER BY id") \
            .fetchall() == [e[:3] for e in events]
        accounts = db.execute("SELECT * FROM accounts ORDER BY id").fetchall()
        orphans = db.execute("SELECT COUNT(*) FROM users WHERE company_id NOT IN "
                             "(SELECT id FROM accounts)").fetchone()
    assert accounts == make_warehouse.generate_accounts(DEMO_DAY)
    assert [a[0] for a in accounts] == [f"c{i:04d}" for i in range(1, 401)]
    assert len({a[1] for a in accounts}) == 400  # every account has a name of its own
    assert orphans == (0,)  # every user's company_id is an account


def test_check_says_when_a_dialect_has_no_read_only_guard(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, {"url": "mysql+pymysql://reader@127.0.0.1:1/shop"}, [RICH])
    code, out, err = cli(capsys, "--config", str(config), "check")
    notes = [line for line in out.splitlines() if "read-only role" in line]
    assert len(notes) == 1 and "'mysql'" in notes[0], out + err
    assert code == 1  # the source itself cannot be reached


def test_check_is_quiet_about_guarded_dialects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _duckdb_warehouse(tmp_path / "w.duckdb", "TIMESTAMP")
    config = _config(tmp_path, {"url": url}, [RICH])
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 0, out + err
    assert "sources.w: ok" in out and "read-only role" not in out


def test_relative_duckdb_path_is_relative_to_the_config_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _duckdb_warehouse(tmp_path / "w.duckdb", "TIMESTAMP")
    config = _config(tmp_path, {"url": "duckdb:///w.duckdb"}, [RICH])
    monkeypatch.chdir("/")
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert _sent(tmp_path / "out.jsonl") == {"rich": {"a", "c"}}
