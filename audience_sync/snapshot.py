"""Snapshots and diffs inside the state database, as set operations keyed by user_id.

A snapshot is loaded into a per-connection temporary table (COPY on PostgreSQL, executemany of
plain tuples on SQLite, or one INSERT ... SELECT when the source is the state database). The
diff is two passes: a LEFT JOIN from the snapshot to the members (entered, or sent values
changed) and an anti-join from the members to the snapshot (exited). No set of ids is ever
held in Python.
"""

from __future__ import annotations

import sqlite3
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    cast,
    column,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.sql.elements import TextClause

from audience_sync import schema as t
from audience_sync.schema import CONTACT_TRAITS, USER_ID_MAX
from audience_sync.sources import SkipCounts, SnapshotRow

SAMPLE_SIZE = 10

_temp = MetaData()
SENT_COLUMNS = (*CONTACT_TRAITS, "value")

stage = Table(
    "as_stage", _temp,
    Column("user_id", String(USER_ID_MAX), primary_key=True),
    *(Column(name, Text) for name in SENT_COLUMNS),
    prefixes=["TEMPORARY"],
)
# Unconstrained landing table for PostgreSQL snapshots that turned out to hold duplicate ids.
raw_stage = Table(
    "as_raw_stage", _temp,
    Column("seq", Integer),
    Column("user_id", String(USER_ID_MAX)),
    *(Column(name, Text) for name in SENT_COLUMNS),
    prefixes=["TEMPORARY"],
)
# Users whose sent values are new or different (or every member, for a resync).
delta = Table(
    "as_delta", _temp,
    Column("user_id", String(USER_ID_MAX), primary_key=True),
    *(Column(name, Text) for name in SENT_COLUMNS),
    Column("is_new", Boolean, nullable=False),
    Column("is_changed", Boolean, nullable=False),
    Column("value_changed", Boolean, nullable=False),
    prefixes=["TEMPORARY"],
)
exited = Table(
    "as_exited", _temp,
    Column("user_id", String(USER_ID_MAX), primary_key=True),
    *(Column(name, Text) for name in SENT_COLUMNS),
    prefixes=["TEMPORARY"],
)
TEMP_TABLES = (stage, raw_stage, delta, exited)


def create_temp_tables(conn: Connection) -> None:
    for table in TEMP_TABLES:
        conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
    for table in TEMP_TABLES:
        table.create(conn)


def drop_temp_tables(conn: Connection) -> None:
    for table in TEMP_TABLES:
        conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))


# -- loading ----------------------------------------------------------------------------------

_SQLITE_INSERT = (
    f"INSERT OR IGNORE INTO {stage.name} (user_id, {', '.join(SENT_COLUMNS)}) "
    f"VALUES (?, {', '.join('?' for _ in SENT_COLUMNS)})"
)
_COPY_COLUMNS = f"(user_id, {', '.join(SENT_COLUMNS)})"


def load_rows(conn: Connection, chunks: Iterable[list[SnapshotRow]], skipped: SkipCounts,
              progress: Callable[[int], None] | None = None,
              replay: Callable[[], Iterable[list[SnapshotRow]]] | None = None) -> int:
    """Load streamed rows into the stage; return how many distinct users it holds.

    Duplicate user ids keep their first row and are counted in `skipped.duplicate`.
    """
    if conn.dialect.name == "postgresql":
        return _copy_rows(conn, chunks, skipped, progress, replay)
    cursor = typing.cast("sqlite3.Connection", conn.connection.driver_connection).cursor()
    loaded = 0
    try:
        for rows in chunks:
            cursor.executemany(_SQLITE_INSERT, rows)
            inserted = cursor.rowcount
            skipped.duplicate += len(rows) - inserted
            loaded += inserted
            if progress:
                progress(len(rows))
    finally:
        cursor.close()
    return loaded


def _copy_rows(conn: Connection, chunks: Iterable[list[SnapshotRow]], skipped: SkipCounts,
               progress: Callable[[int], None] | None,
               replay: Callable[[], Iterable[list[SnapshotRow]]] | None) -> int:
    raw = typing.cast("psycopg.Connection[Any]", conn.connection.driver_connection)
    total = 0
    savepoint = conn.begin_nested()
    try:
        with raw.cursor() as cursor, \
                cursor.copy(f"COPY {stage.name} {_COPY_COLUMNS} FROM STDIN") as copy:
            for rows in chunks:
                for row in rows:
                    copy.write_row(row)
                total += len(rows)
                if progress:
                    progress(len(rows))
        savepoint.commit()
        return total
    except Exception as exc:
        savepoint.rollback()
        if not _is_unique_violation(exc) or replay is None:
            raise
    # Duplicate ids: the fast path cannot keep the first of each, so land everything
    # unconstrained and keep the first row per user id in arrival order.
    skipped.null = skipped.empty = skipped.too_long = 0
    seq = 0
    with raw.cursor() as cursor, \
            cursor.copy(f"COPY {raw_stage.name} (seq, {_COPY_COLUMNS[1:]} FROM STDIN") as copy:
        for rows in replay():
            for row in rows:
                copy.write_row((seq, *row))
                seq += 1
    conn.execute(text(
        f"INSERT INTO {stage.name} {_COPY_COLUMNS} "
        f"SELECT DISTINCT ON (user_id) user_id, {', '.join(SENT_COLUMNS)} "
        f"FROM {raw_stage.name} ORDER BY user_id, seq"))
    loaded = int(conn.execute(select(func.count()).select_from(stage)).scalar_one())
    skipped.duplicate += seq - loaded
    conn.execute(text(f"TRUNCATE {raw_stage.name}"))
    return loaded


def _is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, psycopg.errors.UniqueViolation | IntegrityError)


def insert_select(conn: Connection, statement: TextClause | Any, params: dict[str, Any],
                  kind: str, skipped: SkipCounts) -> int:
    """Fill the stage from a query on the state database itself: no row passes through Python."""
    if isinstance(statement, TextClause):
        names = list(conn.execute(
            text(f"SELECT * FROM ({statement.text}) AS q LIMIT 0"), params).keys())
        sub = statement.columns(*(column(n) for n in names)).subquery("q")
    else:
        sub = statement.subquery("q")
    lowered = {c.name.lower(): c for c in sub.c}
    if "user_id" not in lowered:
        raise SQLAlchemyError("the query returned no user_id column")
    user = func.trim(cast(lowered["user_id"], Text))
    counts = conn.execute(select(
        func.count(),
        func.count() - func.count(lowered["user_id"]),
        func.sum(func.coalesce(func.length(user) == 0, false()).cast(Integer)),
        func.sum(func.coalesce(func.length(user) > USER_ID_MAX, false()).cast(Integer)),
    ).select_from(sub), params).one()
    skipped.null += int(counts[1] or 0)
    skipped.empty += int(counts[2] or 0)
    skipped.too_long += int(counts[3] or 0)
    valid = int(counts[0] or 0) - skipped.null - skipped.empty - skipped.too_long
    values: list[Any] = [user.label("user_id")]
    for name in CONTACT_TRAITS:
        values.append(cast(lowered[name], Text).label(name) if name in lowered
                      else literal(None, Text).label(name))
    if kind == "trait" and "value" in lowered:
        as_json = (func.json_quote(lowered["value"]) if conn.dialect.name == "sqlite"
                   else cast(func.to_jsonb(lowered["value"]), Text))
        values.append(func.coalesce(as_json, "null").label("value"))
    else:
        values.append(literal(None, Text).label("value"))
    source = select(*values).where(
        lowered["user_id"].is_not(None), func.length(user) > 0,
        func.length(user) <= USER_ID_MAX)
    target = ["user_id", *SENT_COLUMNS]
    statement_: Any
    if conn.dialect.name == "postgresql":
        statement_ = postgresql.insert(stage).from_select(target, source).on_conflict_do_nothing()
    else:
        statement_ = insert(stage).prefix_with("OR IGNORE").from_select(target, source)
    conn.execute(statement_, params)
    inserted = int(conn.execute(select(func.count()).select_from(stage)).scalar_one())
    skipped.duplicate += valid - inserted
    return inserted


# -- diff -------------------------------------------------------------------------------------

@dataclass
class Diff:
    entered: int = 0
    exited: int = 0
    changed: int = 0
    unchanged_resent: int = 0
    sample_entered: list[str] = field(default_factory=list)
    sample_exited: list[str] = field(default_factory=list)


def compute_diff(conn: Connection, computation_id: int, resync: bool) -> Diff:
    """Fill as_delta and as_exited from the stage and the current members."""
    m = t.members
    member_of = and_(m.c.computation_id == computation_id, m.c.user_id == stage.c.user_id)
    differs = [stage.c[name].is_distinct_from(m.c[name]) for name in SENT_COLUMNS]
    is_new = m.c.user_id.is_(None)
    joined = stage.outerjoin(m, member_of)
    changed_expr = or_(*differs)
    selection = select(
        stage.c.user_id, *(stage.c[name] for name in SENT_COLUMNS),
        is_new, and_(~is_new, changed_expr),
        and_(~is_new, stage.c.value.is_distinct_from(m.c.value)),
    ).select_from(joined)
    if not resync:
        selection = selection.where(or_(is_new, changed_expr))
    conn.execute(insert(delta).from_select(
        ["user_id", *SENT_COLUMNS, "is_new", "is_changed", "value_changed"], selection))
    conn.execute(insert(exited).from_select(
        ["user_id", *SENT_COLUMNS],
        select(m.c.user_id, *(m.c[name] for name in SENT_COLUMNS)).where(
            m.c.computation_id == computation_id,
            ~exists().where(stage.c.user_id == m.c.user_id))))
    counts = conn.execute(select(
        func.count().filter(delta.c.is_new == true()),
        func.count().filter(delta.c.is_changed == true()),
        func.count().filter(and_(delta.c.is_new == false(), delta.c.is_changed == false())),
    ).select_from(delta)).one()
    diff = Diff(entered=int(counts[0]), changed=int(counts[1]), unchanged_resent=int(counts[2]))
    diff.exited = int(conn.execute(select(func.count()).select_from(exited)).scalar_one())
    diff.sample_entered = list(conn.execute(
        select(delta.c.user_id).where(delta.c.is_new == true())
        .order_by(delta.c.user_id).limit(SAMPLE_SIZE)).scalars())
    diff.sample_exited = list(conn.execute(
        select(exited.c.user_id).order_by(exited.c.user_id).limit(SAMPLE_SIZE)).scalars())
    return diff
