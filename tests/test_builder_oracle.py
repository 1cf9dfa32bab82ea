"""The builder's compiled SQL against an independent evaluator (tests/builder_oracle.py), for
many random definitions, on SQLite, PostgreSQL and DuckDB sources.

The rows are written once per source per module, with timestamps of a different type per
table (ISO text in several spellings, naive, aware); time is frozen at oracle.NOW, and many
events sit exactly on a window's edge or a millisecond either side.
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from audience_sync import builder
from audience_sync.config import Computation, Source
from audience_sync.sources import SkipCounts, SourceRows, create_source_engine
from tests import builder_oracle as oracle

DEFINITIONS = 300
SLOW_DEFINITIONS = 3000
DATA = oracle.generate()
# Audiences the random definitions may reference (ref_a references ref_b).
_REF_RNG = random.Random(99)
REFERENCED = {"ref_b": oracle.random_where(_REF_RNG)}
REFERENCED["ref_a"] = oracle.random_where(_REF_RNG, ["ref_b"])


def _spell(at: datetime, i: int) -> str:
    """ISO-8601 as warehouses write it: T or space, Z or an offset, with or without millis."""
    ms = f"{at.microsecond // 1000:03d}"
    base = at.astimezone(UTC)
    return [base.strftime(f"%Y-%m-%dT%H:%M:%S.{ms}Z"),
            base.strftime(f"%Y-%m-%d %H:%M:%S.{ms}+00:00"),
            base.strftime("%Y-%m-%dT%H:%M:%S") + (f".{ms}" if ms != "000" else "") + "Z"][i % 3]


# Per source: each table's timestamp column type, and how a value is written into it.
TS_TYPES = {
    "sqlite": {"tracks": "text", "order_completed": "text", "product_viewed": "text",
               "plan_changed": "text"},
    "postgresql": {"tracks": "timestamptz", "order_completed": "timestamp",
                   "product_viewed": "text", "plan_changed": "timestamptz"},
    "duckdb": {"tracks": "timestamp", "order_completed": "timestamptz",
               "product_viewed": "varchar", "plan_changed": "timestamp"},
}
NUMBER = {"sqlite": "real", "postgresql": "double precision", "duckdb": "double"}


def _ts_value(kind: str, at: datetime, i: int) -> Any:
    if kind in ("text", "varchar"):
        return _spell(at, i)
    if kind == "timestamp":
        return at.astimezone(UTC).replace(tzinfo=None)
    return at


def _statements(dialect: str) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """(CREATE TABLE, rows) per table; inserted by the caller."""
    ts = TS_TYPES[dialect]
    num = NUMBER[dialect]
    out: list[tuple[str, list[tuple[Any, ...]]]] = []
    users = [tuple(u[c] for c in oracle.USERS_COLUMNS) for u in DATA.users]
    out.append(("CREATE TABLE users (id text, email text, name text, title text, plan text, "
                f"country text, score {num})", users))
    out.append((f"CREATE TABLE tracks (user_id text, event text, timestamp {ts['tracks']})",
                [(e.user_id, e.event, _ts_value(ts["tracks"], e.at, i))
                 for i, e in enumerate(DATA.events)]))
    for event, table in oracle.TABLES.items():
        props = oracle.PROPERTIES[event]
        columns = ", ".join(f"{p} {num if isinstance(v[1], float) else 'text'}"
                            for p, v in props.items())
        out.append((f"CREATE TABLE {table} (user_id text, timestamp {ts[table]}, {columns})",
                    [(e.user_id, _ts_value(ts[table], e.at, i + 1),
                      *(e.props[p] for p in props))
                     for i, e in enumerate(DATA.events) if e.event == event]))
    return out


def _insert_sql(create: str, width: int, mark: str) -> str:
    name = create.split()[2]
    return f"INSERT INTO {name} VALUES ({', '.join([mark] * width)})"


@pytest.fixture(scope="module", params=["sqlite", "postgresql", "duckdb"])
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) \
        -> Iterator[tuple[Source, Engine]]:
    dialect = request.param
    folder = tmp_path_factory.mktemp(f"oracle_{dialect}")
    schema = None
    admin = None
    if dialect == "sqlite":
        path = folder / "w.db"
        db = sqlite3.connect(path)
        for create, rows in _statements(dialect):
            db.execute(create)
            db.executemany(_insert_sql(create, len(rows[0]), "?"), rows)
        db.commit()
        db.close()
        url = f"sqlite:///{path}"
    elif dialect == "duckdb":
        duckdb = pytest.importorskip("duckdb")
        path = folder / "w.duckdb"
        ddb = duckdb.connect(str(path))
        ddb.execute("SET TimeZone = 'UTC'")
        for create, rows in _statements(dialect):
            ddb.execute(create)
            ddb.executemany(_insert_sql(create, len(rows[0]), "?"), rows)
        ddb.close()
        url = f"duckdb:///{path}"
    else:
        admin = request.getfixturevalue("pg_admin_url")
        schema = f"oracle_{uuid.uuid4().hex[:10]}"
        engine = create_engine(admin)
        with engine.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
            conn.execute(text(f"SET LOCAL search_path = {schema}"))
            for create, rows in _statements(dialect):
                conn.execute(text(create))
                width = len(rows[0])
                sql = _insert_sql(create, width, "%s")
                conn.connection.driver_connection.cursor().executemany(sql, rows)  # type: ignore[union-attr]
        engine.dispose()
        url = admin + ("&" if "?" in admin else "?") + f"options=-csearch_path%3D{schema}"
    src = Source(url=url)
    engine = create_source_engine(url)
    try:
        yield src, engine
    finally:
        engine.dispose()
        if schema is not None and admin is not None:
            admin_engine = create_engine(admin)
            with admin_engine.begin() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin_engine.dispose()


def _computation(kind: str, definition: builder.Definition, src: Source) -> Computation:
    return Computation(kind=kind, key="k", name="k", source_name="w", source=src,  # type: ignore[arg-type]
                       destinations=(), query=None, rule=None, every=timedelta(hours=1),
                       jitter=timedelta(0), max_removal_fraction=1.0, path="oracle",
                       definition=definition)


def _snapshot(comp: Computation, engine: Engine) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    snapshot = SourceRows(comp, engine, oracle.NOW, SkipCounts())
    for chunk in snapshot:
        rows += chunk
    return rows


def _audience(raw_where: list[Any]) -> builder.Group:
    """Parse as config load does, references inlined."""
    parsed = {key: builder.parse_where(where, key) for key, where in REFERENCED.items()}
    parsed["me"] = builder.parse_where(raw_where, "where")
    audiences = [builder.Audience(key, key, key, "w", cond, None) for key, cond in parsed.items()]
    inlined = builder.inline_references(audiences)["me"]
    assert isinstance(inlined, builder.Group)
    return inlined


def _check_audiences(source: tuple[Source, Engine], count: int, seed: int) -> None:
    src, engine = source
    judge = oracle.Oracle(DATA, REFERENCED)
    rng = random.Random(seed)
    nontrivial = 0
    for i in range(count):
        where = oracle.random_where(rng, ["ref_a", "ref_b"])
        expected = judge.members(where)
        got = {row[0] for row in _snapshot(_computation("audience", _audience(where), src),
                                           engine)}
        assert got == expected, f"definition {i}: {json.dumps(where)}: " \
            f"extra {sorted(got - expected)[:5]}, missing {sorted(expected - got)[:5]}"
        nontrivial += 0 < len(expected) < len(judge.universe)
    # Mostly neither empty nor everyone: otherwise agreement would prove little.
    assert nontrivial > count // 2


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _check_traits(source: tuple[Source, Engine], count: int, seed: int) -> None:
    src, engine = source
    judge = oracle.Oracle(DATA)
    rng = random.Random(seed)
    for i in range(count):
        kind = builder.COMPUTE_KINDS[i % len(builder.COMPUTE_KINDS)]
        raw = oracle.random_compute(rng, kind)
        expected = judge.trait(raw)
        comp = _computation("trait", builder.parse_compute(raw, "compute"), src)
        got = {row[0]: json.loads(row[-1]) for row in _snapshot(comp, engine)}
        assert got.keys() == expected.keys(), f"trait {i}: {json.dumps(raw)}"
        for user, value in expected.items():
            assert _same(got[user], value), f"trait {i}: {json.dumps(raw)}: {user}: " \
                f"{got[user]!r} != {value!r}"
        if kind == "count":
            assert all(type(v) is int for v in got.values())


def test_compiled_audiences_match_the_evaluator(source: tuple[Source, Engine]) -> None:
    _check_audiences(source, DEFINITIONS, seed=1)


def test_compiled_traits_match_the_evaluator(source: tuple[Source, Engine]) -> None:
    _check_traits(source, DEFINITIONS // 2, seed=2)


@pytest.mark.slow
def test_compiled_definitions_match_the_evaluator_at_scale(
        source: tuple[Source, Engine], request: pytest.FixtureRequest) -> None:
    """Ten times the definitions: minutes, so in CI (CI=true) or when asked (`-m slow`)."""
    if not os.environ.get("CI") and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the big run: in CI, or pytest -m slow")
    _check_audiences(source, SLOW_DEFINITIONS, seed=3)
    _check_traits(source, SLOW_DEFINITIONS // 2, seed=4)


def test_the_generated_rows_sit_on_the_window_edges() -> None:
    """The edges the evaluator and the SQL must agree on are really in the data."""
    ats = {e.at for e in DATA.events}
    for duration in oracle.DURATIONS.values():
        edge = oracle.NOW - duration
        assert {edge, edge + timedelta(milliseconds=1), edge - timedelta(milliseconds=1)} <= ats
    assert any(e.at > oracle.NOW for e in DATA.events)


def test_rows_written_once_per_source(tmp_path: Path) -> None:
    """The count the closing note reports."""
    assert DATA.rows > 2000
