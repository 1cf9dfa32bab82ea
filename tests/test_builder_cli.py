"""`compile`, `preview` and `check` for builder definitions, and a `where:` audience and a
`compute:` trait synced end to end."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import create_engine, text

from tests.helpers import cli, write_config

AT = "2026-11-30T12:00:00Z"
USERS = [("a", "a@x.io", "premium"), ("b", "b@x.io", "free"), ("c", None, "premium")]
ORDERS = [  # user_id, timestamp, total, currency
    ("a", "2026-11-29T10:00:00Z", 150.0, "usd"), ("a", "2026-11-28 10:00:00+00:00", 120.0, "usd"),
    ("b", "2026-11-29T10:00:00Z", 500.0, "eur"), ("b", "2026-11-20T10:00:00Z", 300.0, "eur"),
    ("c", "2026-11-29T10:00:00Z", 20.0, "usd"), ("c", "2026-09-01T10:00:00Z", 999.0, "gbp"),
]
BIG_SPENDERS = {
    "name": "Big Spenders", "key": "big_spenders",
    "where": [{"event": "Order Completed", "within": "30d", "count": {"at_least": 2},
               "where": [{"property": "total", "op": ">", "value": 100}]},
              {"trait": {"name": "plan", "op": "=", "value": "premium"}}]}
SPEND = {"name": "Spend", "key": "spend",
         "compute": {"sum": {"event": "Order Completed", "property": "total"},
                     "within": "30d"}}
CURRENCIES = {"name": "Currencies", "key": "currencies",
              "compute": {"unique_list": {"event": "Order Completed", "property": "currency"}}}
PREMIUM = {"name": "Premium", "key": "premium",
           "query": "SELECT id AS user_id, email FROM users WHERE plan = 'premium'"}


def _warehouse(path: Path) -> str:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE users (id TEXT, email TEXT, plan TEXT);
        CREATE TABLE tracks (user_id TEXT, event TEXT, timestamp TEXT);
        CREATE TABLE order_completed (user_id TEXT, timestamp TEXT, total REAL, currency TEXT);
    """)
    db.executemany("INSERT INTO users VALUES (?, ?, ?)", USERS)
    db.executemany("INSERT INTO order_completed VALUES (?, ?, ?, ?)", ORDERS)
    db.executemany("INSERT INTO tracks VALUES (?, 'Order Completed', ?)",
                   [(u, t) for u, t, *_ in ORDERS])
    db.commit()
    db.close()
    return f"sqlite:///{path}"


def _config(tmp_path: Path, url: str, audiences: list[dict[str, Any]],
            traits: list[dict[str, Any]] | None = None) -> Path:
    document: dict[str, Any] = {
        "state_db": f"sqlite:///{tmp_path / 'state.db'}",
        "sources": {"w": {"url": url}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"source": "w", "destinations": ["file"], **a} for a in audiences],
    }
    if traits:
        document["computed_traits"] = [{"source": "w", "destinations": ["file"], **t}
                                       for t in traits]
    return write_config(tmp_path / "config.yaml", document)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return _config(tmp_path, _warehouse(tmp_path / "w.db"), [BIG_SPENDERS, PREMIUM],
                   [SPEND, CURRENCIES])


def _sql(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if not line.startswith("--"))


def test_compile_prints_runnable_sql_with_the_windows_bound_from_the_clock(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "--config", str(config), "compile", "big_spenders", "--at", AT)
    assert code == 0, err
    assert out.startswith("-- audience big_spenders (where:) on source 'w' (sqlite), clock "
                          "2026-11-30T12:00:00+00:00\n")
    assert "julianday('2026-10-31T12:00:00+00:00')" in out and "users.\"plan\" = 'premium'" in out
    db = sqlite3.connect(tmp_path / "w.db")
    assert {row[0] for row in db.execute(_sql(out))} == {"a"}  # b is free, c spent too little


def test_compile_prints_every_kind_of_definition(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for key, kind in (("premium", "query"), ("spend", "compute"), ("currencies", "compute")):
        code, out, err = cli(capsys, "--config", str(config), "compile", key, "--at", AT)
        assert code == 0, err
        assert f"({kind}:)" in out.splitlines()[0]
    assert "json_group_array(DISTINCT order_completed.currency)" in out


def test_preview_counts_and_samples_and_writes_nothing(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "--config", str(config), "preview", "premium", "--limit", "1")
    assert code == 0, err
    assert out.splitlines()[0].startswith("premium: 2 members (source 'w'")
    assert "a@x.io" in out and "c" not in out.split("\n", 1)[1].replace("email", "")
    code, out, err = cli(capsys, "--config", str(config), "preview", "currencies", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert document["count"] == 3
    assert {u["user_id"]: u["value"] for u in document["sample"]} == {
        "a": ["usd"], "b": ["eur"], "c": ["gbp", "usd"]}
    assert not (tmp_path / "state.db").exists()


def test_preview_of_an_unknown_name_is_a_usage_error(
        config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--config", str(config), "preview", "nope")
    assert code == 2 and "unknown audience 'nope'" in err


def test_check_names_missing_event_tables_properties_and_traits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _warehouse(tmp_path / "w.db")
    config = _config(tmp_path, url, [
        {"name": "No Table", "where": [{"event": "Refund Issued", "where": [
            {"property": "amount", "op": ">", "value": 1}]}]},
        {"name": "No Property", "where": [{"event": "Order Completed", "where": [
            {"property": "totl", "op": ">", "value": 1}]}]},
        {"name": "No Trait", "where": [{"trait": {"name": "tier", "op": "exists"}}]},
    ], [{"name": "Fine", "compute": {"count": "Order Completed"}}])
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 1, out + err
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert failed == [
        "audiences[0] (no_table): FAILED: event 'Refund Issued': the source has no table "
        "'refund_issued'",
        "audiences[1] (no_property): FAILED: event 'Order Completed': table "
        "'order_completed' has no column 'totl'",
        "audiences[2] (no_trait): FAILED: trait 'tier': table 'users' has no column 'tier'",
    ]


def test_sync_sends_a_where_audience_and_computed_traits(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with freeze_time(AT):
        code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    sent: dict[str, dict[str, Any]] = {}
    for line in (tmp_path / "out.jsonl").read_text().splitlines():
        message = json.loads(line)
        key = message["context"]["personas"]["computation_key"]
        sent.setdefault(key, {})[message["userId"]] = message["traits"][key]
    assert sent["big_spenders"] == {"a": True}
    assert sent["currencies"] == {"a": ["usd"], "b": ["eur"], "c": ["gbp", "usd"]}
    assert sent["spend"] == {"a": 270, "b": 800, "c": 20}  # c's 999 is older than 30 days


@pytest.fixture
def pg_warehouse(pg_admin_url: str) -> Iterator[str]:
    schema = f"bcli_{uuid.uuid4().hex[:10]}"
    engine = create_engine(pg_admin_url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE TABLE {schema}.users (id text, email text, plan text)"))
        conn.execute(text(f"CREATE TABLE {schema}.tracks "
                          "(user_id text, event text, timestamp timestamptz)"))
        conn.execute(text(f"CREATE TABLE {schema}.order_completed (user_id text, "
                          "timestamp timestamp, total float, currency text)"))
    try:
        yield f"{pg_admin_url}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def test_compile_speaks_the_source_dialect(
        pg_warehouse: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, pg_warehouse, [BIG_SPENDERS])
    code, out, err = cli(capsys, "--config", str(config), "compile", "big_spenders", "--at", AT)
    assert code == 0, err
    assert "(postgresql)" in out.splitlines()[0]
    assert "julianday" not in out and "'2026-10-31 12:00:00'" in out


def test_check_names_a_missing_event_table_on_postgresql(
        pg_warehouse: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The columns probe fails inside a transaction there; what follows must still work."""
    config = _config(tmp_path, pg_warehouse, [
        {"name": "No Table", "where": [{"event": "Refund Issued", "where": [
            {"property": "amount", "op": ">", "value": 1}]},
            {"trait": {"name": "plan", "op": "exists"}}]},
        BIG_SPENDERS,
    ])
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 1, out + err
    assert [line for line in out.splitlines() if "FAILED" in line] == [
        "audiences[0] (no_table): FAILED: event 'Refund Issued': the source has no table "
        "'refund_issued'"]


def test_a_unique_list_read_from_the_state_database_itself_is_a_sorted_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A source that is the state database is staged in SQL, where SQLite's list aggregate
    is JSON text: such a trait must still arrive as a sorted list, as from any source."""
    url = _warehouse(tmp_path / "both.db")
    config = write_config(tmp_path / "config.yaml", {
        "state_db": url, "sources": {"w": {"url": url}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "computed_traits": [{"source": "w", "destinations": ["file"], **CURRENCIES}],
    })
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    sent = {json.loads(line)["userId"]: json.loads(line)["traits"]["currencies"]
            for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert sent == {"a": ["usd"], "b": ["eur"], "c": ["gbp", "usd"]}


def test_event_tables_follow_the_source_schema_and_tables_events(
        pg_admin_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`schema:` qualifies Segment's tables; `tables.events` names an event's own table,
    `schema.table` kept as written."""
    segment, shop = f"seg_{uuid.uuid4().hex[:8]}", f"shop_{uuid.uuid4().hex[:8]}"
    engine = create_engine(pg_admin_url)
    with engine.begin() as conn:
        for schema in (segment, shop):
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f"CREATE TABLE {segment}.users (id text, email text, plan text)"))
        conn.execute(text(f"CREATE TABLE {segment}.tracks "
                          "(user_id text, event text, timestamp timestamptz)"))
        conn.execute(text(f"CREATE TABLE {shop}.orders (user_id text, timestamp text, "
                          "total float)"))
        conn.execute(text(f"INSERT INTO {segment}.users VALUES ('a', 'a@x.io', 'premium'), "
                          "('b', 'b@x.io', 'premium')"))
        yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
        conn.execute(text(f"INSERT INTO {shop}.orders VALUES ('a', :t, 150), ('b', :t, 5)"),
                     {"t": yesterday})
    try:
        config = write_config(tmp_path / "config.yaml", {
            "state_db": f"sqlite:///{tmp_path / 'state.db'}",
            "sources": {"w": {"url": pg_admin_url, "schema": segment,
                              "tables": {"events": {"Order Completed": f"{shop}.orders"}}}},
            "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
            "audiences": [{"name": "Big", "source": "w", "destinations": ["file"], "where": [
                {"event": "Order Completed", "within": "30d",
                 "where": [{"property": "total", "op": ">", "value": 100}]},
                {"trait": {"name": "plan", "op": "=", "value": "premium"}}]}],
        })
        code, out, err = cli(capsys, "--config", str(config), "compile", "big", "--at", AT)
        assert code == 0, err
        assert f"{shop}.orders" in out and f"{segment}.users" in out
        code, out, err = cli(capsys, "--config", str(config), "preview", "big", "--json")
        assert code == 0, err
        assert [u["user_id"] for u in json.loads(out)["sample"]] == ["a"]
    finally:
        with engine.begin() as conn:
            for schema in (segment, shop):
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def test_a_referenced_query_audience_is_read_as_a_subquery(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _warehouse(tmp_path / "w.db")
    recent = {"name": "Recent", "query": "SELECT user_id FROM order_completed "
              "WHERE julianday(timestamp) > julianday(:now) - 60"}  # binds :now
    config = _config(tmp_path, url, [PREMIUM, recent, {
        "name": "Premium Buyers", "key": "premium_buyers",
        "where": [{"audience": "premium"}, {"audience": "recent"},
                  {"event": "Order Completed", "count": {"at_least": 2}}]}])
    with freeze_time(AT):
        code, out, err = cli(capsys, "--config", str(config), "preview", "premium_buyers",
                             "--json")
    assert code == 0, err
    assert [u["user_id"] for u in json.loads(out)["sample"]] == ["a", "c"]
