"""Snapshots and diffs inside the state database, as set operations keyed by user_id.

A snapshot is loaded into a per-connection temporary table (COPY on PostgreSQL, executemany of
plain tuples on SQLite, or one INSERT ... SELECT when the source is the state database). The
diff is two passes: a LEFT JOIN from the snapshot to the members (entered, or sent values
changed) and an anti-join from the members to the snapshot (exited). No set of ids is ever
held in Python.
"""

from __future__ import annotations

import contextlib
import sqlite3
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    and_,
    case,
    cast,
    column,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.sql.elements import TextClause

if typing.TYPE_CHECKING:
    import psycopg

from audience_sync.messages import CONTACT_TRAITS, GROUP, USER_ID_MAX
from audience_sync.sources import ACCOUNT_COLUMNS, SkipCounts, SourceRows
from audience_sync.state import schema as t

SAMPLE_SIZE = 10

_temp = MetaData()
# What a member's calls carry, as stored: the contact traits, an account's user_ref (the user
# its group calls name) and traits (its other columns, as JSON), and a trait's value (last:
# the streamed rows end with it).
SENT_COLUMNS = (*CONTACT_TRAITS, "user_ref", "traits", "value")

stage = Table(
    "as_stage", _temp,
    Column("user_id", String(USER_ID_MAX), primary_key=True),
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
# PostgreSQL: the stage and the current members joined once (full join), keeping the rows
# that differ: new users, changed ones (their stored values as old_*) and users gone.
joined = Table(
    "as_joined", _temp,
    Column("user_id", String(USER_ID_MAX)),
    *(Column(name, Text) for name in SENT_COLUMNS),
    Column("is_new", Boolean),
    Column("is_changed", Boolean),
    Column("value_changed", Boolean),
    Column("old_user_id", String(USER_ID_MAX)),
    *(Column(f"old_{name}", Text) for name in SENT_COLUMNS),
    prefixes=["TEMPORARY"],
)
# Account audiences fanned out to users: the source's account_users rows, the users of the
# member accounts now (each with the account that puts them in, the smallest id, and its
# value), and their diff against fanout_members.
account_users = Table(
    "as_account_users", _temp,
    Column("user_id", String(USER_ID_MAX)),
    Column("group_id", String(USER_ID_MAX)),
    prefixes=["TEMPORARY"],
)


def _fan_table(name: str, *extra: Column[Any]) -> Table:
    """A user of the fan-out: the account that puts them in and its value."""
    return Table(name, _temp,
                 Column("user_id", String(USER_ID_MAX), primary_key=True),
                 Column("group_id", String(USER_ID_MAX), nullable=False),
                 Column("value", Text), *extra, prefixes=["TEMPORARY"])


fan = _fan_table("as_fan")
# Users new to the fan-out, whose value changed, or (no call) whose account alone changed; on
# a resync every user.
fan_delta = _fan_table(
    "as_fan_delta",
    Column("is_new", Boolean, nullable=False),
    Column("value_changed", Boolean, nullable=False),
    Column("sends", Boolean, nullable=False),  # its change is sent (not an account move alone)
)
fan_exited = _fan_table("as_fan_exited")
TEMP_TABLES = (stage, delta, exited, joined)
# Created only by a run that fans out (load_account_users): every other run does without.
FAN_TABLES = (account_users, fan, fan_delta, fan_exited)


def create_temp_tables(conn: Connection) -> None:
    drop_temp_tables(conn)
    columns = ", ".join(f"{name} TEXT" for name in SENT_COLUMNS)
    if conn.dialect.name == "postgresql":
        # Loaded bare and keyed afterwards (see _key_stage): one bulk index build.
        conn.execute(text(f"CREATE TEMPORARY TABLE {stage.name} (user_id TEXT, {columns})"))
    else:
        # Clustered by user_id: the diff walks the stage and the members in the same order.
        # INSERT OR IGNORE drops repeated ids as they land.
        conn.execute(text(f"CREATE TEMPORARY TABLE {stage.name} "
                          f"(user_id TEXT PRIMARY KEY NOT NULL, {columns}) WITHOUT ROWID"))
    if conn.dialect.name != "postgresql":  # PostgreSQL creates them from the diff's queries
        delta.create(conn)
        exited.create(conn)


def drop_temp_tables(conn: Connection, *, fan_out: bool = False) -> None:
    """The run's temporary tables (and the fan-out's, when it had them)."""
    for table in (*TEMP_TABLES, *(FAN_TABLES if fan_out else ())):
        conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))


# -- loading ----------------------------------------------------------------------------------

def load_rows(conn: Connection, snapshot: SourceRows,
              progress: Callable[[int], None] | None = None) -> int:
    """Load streamed rows into the stage; return how many distinct users it holds.

    SQLite drops repeated user ids as they land (the stage's primary key) and counts them in
    `skipped.duplicate`; PostgreSQL loads an unkeyed stage and compute_diff finds them.
    """
    if conn.dialect.name == "postgresql":
        return _copy_rows(conn, stage.name, snapshot, lambda: snapshot.columns, progress)
    return _insert_rows(conn, f"INSERT OR IGNORE INTO {stage.name}", snapshot,
                        lambda: snapshot.columns, snapshot.skipped, progress)


def load_account_users(conn: Connection, rows: Iterable[list[tuple[Any, ...]]]) -> int:
    """Create the fan-out's temporary tables and load the source's account_users rows
    (user_id, group_id) into the first; repeated pairs are harmless (the fan-out groups
    them)."""
    for table in FAN_TABLES:
        conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
        table.create(conn)
    columns = ("user_id", "group_id")
    if conn.dialect.name == "postgresql":
        return _copy_rows(conn, account_users.name, rows, lambda: columns, None)
    return _insert_rows(conn, f"INSERT INTO {account_users.name}", rows, lambda: columns,
                        None, None)


def _insert_rows(conn: Connection, into: str, chunks: Iterable[list[tuple[Any, ...]]],
                 columns: Callable[[], tuple[str, ...]], skipped: SkipCounts | None,
                 progress: Callable[[int], None] | None) -> int:
    """executemany of each chunk (`columns()`: known once the first chunk arrived); rows the
    statement ignored are counted as duplicates in `skipped`."""
    cursor = typing.cast("sqlite3.Connection", conn.connection.driver_connection).cursor()
    loaded = 0
    statement = ""
    try:
        for rows in chunks:
            if not statement:
                names = columns()
                statement = (f"{into} ({', '.join(names)})"
                             f" VALUES ({', '.join('?' for _ in names)})")
            cursor.executemany(statement, rows)
            inserted = cursor.rowcount
            if skipped is not None:
                skipped.duplicate += len(rows) - inserted
            loaded += inserted
            if progress:
                progress(len(rows))
    finally:
        cursor.close()
    return loaded


def _copy_rows(conn: Connection, into: str, chunks: Iterable[list[tuple[Any, ...]]],
               columns: Callable[[], tuple[str, ...]],
               progress: Callable[[int], None] | None) -> int:
    raw = typing.cast("psycopg.Connection[Any]", conn.connection.driver_connection)
    total = 0
    copy: Any = None
    with raw.cursor() as cursor, contextlib.ExitStack() as stack:
        for rows in chunks:
            if copy is None:  # the columns are known once the first chunk arrived
                names = columns()
                copy = stack.enter_context(cursor.copy(
                    f"COPY {into} ({', '.join(names)}) FROM STDIN"))
            _write_chunk(copy, rows, len(names))
            total += len(rows)
            if progress:
                progress(len(rows))
    # Temporary tables are never auto-analyzed; the diff's join plans need the row count.
    conn.execute(text(f"ANALYZE {into}"))
    return total


def _write_chunk(copy: Any, rows: list[Any], width: int) -> None:
    if width == 1:
        # Ids only: one block of text per chunk, unless an id needs COPY escaping.
        try:
            block = "\n".join([row[0] for row in rows])
        except TypeError:  # a null or a number among the ids: let write_row format them
            block = "\t"
        if not ("\\" in block or "\t" in block or "\r" in block
                or block.count("\n") != len(rows) - 1):
            if rows:
                copy.write(block + "\n")
            return
    for row in rows:
        copy.write_row(row)


def dedupe_stage(conn: Connection) -> int:
    """PostgreSQL: drop repeated user ids from the unkeyed stage, keeping the first row.

    A fresh heap filled by one COPY or INSERT keeps arrival order in ctid.
    """
    return int(conn.execute(text(
        f"DELETE FROM {stage.name} a USING {stage.name} b "
        "WHERE a.user_id = b.user_id AND a.ctid > b.ctid")).rowcount)


def insert_select(conn: Connection, statement: TextClause | Any, params: dict[str, Any],
                  kind: str, skipped: SkipCounts, level: str = "user") -> int:
    """Fill the stage from a query on the state database itself: no row passes through Python.
    An account computation's key is its group_id (and its user_id the group call's user)."""
    if isinstance(statement, TextClause):
        names = list(conn.execute(
            text(f"SELECT * FROM ({statement.text}) AS q LIMIT 0"), params).keys())
        sub = statement.columns(*(column(n) for n in names)).subquery("q")
    else:
        sub = statement.subquery("q")
    lowered = {c.name.lower(): c for c in sub.c}
    key = "group_id" if level == "account" else "user_id"
    if key not in lowered:
        raise SQLAlchemyError(f"the query returned no {key} column")
    sqlite = conn.dialect.name == "sqlite"
    raw_id = lowered[key]
    user, bad_type = _id_as_text(raw_id, sqlite)
    value = lowered.get("value") if kind == "trait" else None
    # Why a row is dropped (None: kept), in the order the streamed path checks.
    reason = case(
        (raw_id.is_(None), "null"),
        (bad_type, "bad_type"),
        (func.length(func.trim(user)) == 0, "empty"),
        (func.length(user) > USER_ID_MAX, "too_long"),
        (_non_finite(value, sqlite) if value is not None else false(), "non_finite"),
        else_=None).label("reason")
    counted = select(reason).select_from(sub).subquery("r")
    valid = 0
    for why, n in conn.execute(select(counted.c.reason, func.count())
                               .group_by(counted.c.reason), params):
        if why is None:
            valid = int(n)
        else:
            setattr(skipped, why, getattr(skipped, why) + int(n))
    values: list[Any] = [user.label("user_id")]
    for name in CONTACT_TRAITS:
        values.append(cast(lowered[name], Text).label(name) if name in lowered
                      else literal(None, Text).label(name))
    values.append(cast(lowered["user_id"], Text).label("user_ref")
                  if level == "account" and "user_id" in lowered
                  else literal(None, Text).label("user_ref"))
    values.append(_account_traits(conn, [c for name, c in lowered.items()
                                         if name not in ACCOUNT_COLUMNS])
                  if level == "account" else literal(None, Text).label("traits"))
    if value is not None:
        as_json = func.json_quote(value) if sqlite else cast(func.to_jsonb(value), Text)
        values.append(func.coalesce(as_json, "null").label("value"))
    else:
        values.append(literal(None, Text).label("value"))
    source = select(*values).where(reason.is_(None))
    target = ["user_id", *SENT_COLUMNS]
    if conn.dialect.name == "postgresql":
        conn.execute(insert(stage).from_select(target, source), params)
        return valid  # compute_diff finds repeated ids
    conn.execute(insert(stage).prefix_with("OR IGNORE").from_select(target, source), params)
    inserted = int(conn.execute(select(func.count()).select_from(stage)).scalar_one())
    skipped.duplicate += valid - inserted
    return inserted


def _account_traits(conn: Connection, columns: list[Any]) -> Any:
    """An account definition's other columns as one JSON object (null when there are none),
    built by the database: the same-database path sends no row through Python."""
    if not columns:
        return literal(None, Text).label("traits")
    pairs = [part for c in columns for part in (literal(c.name), c)]
    if conn.dialect.name == "sqlite":
        return func.json_object(*pairs).label("traits")
    return cast(func.jsonb_build_object(*pairs), Text).label("traits")


_PG_NUMBERS = "('double precision'::regtype, 'real'::regtype, 'numeric'::regtype)"


def _id_as_text(raw: Any, sqlite: bool) -> tuple[Any, Any]:
    """The user id as text, and the condition that it is no id at all (as the streamed path:
    integers and integral numbers are ids, bytes, fractions and booleans are not)."""
    if sqlite:
        kind = func.typeof(raw)
        integral = and_(kind == "real", raw == cast(raw, Integer))
        text_id = case((integral, cast(cast(raw, Integer), Text)), else_=cast(raw, Text))
        return text_id, or_(kind == "blob", and_(kind == "real", ~integral))
    kind = func.pg_typeof(raw)
    spelled = cast(raw, Text)
    is_number = kind.op("IN")(literal_column(_PG_NUMBERS))
    text_id = case((is_number, func.regexp_replace(spelled, r"\.0*$", "")), else_=spelled)
    fraction = and_(is_number, ~spelled.regexp_match(r"^-?[0-9]+(\.0*)?$"))
    binary = kind.op("IN")(literal_column("('bytea'::regtype, 'boolean'::regtype)"))
    return text_id, or_(binary, fraction)


def _non_finite(value: Any, sqlite: bool) -> Any:
    """NaN and the infinities, which JSON cannot carry (SQLite stores no NaN)."""
    if sqlite:
        return and_(func.typeof(value) == "real", (value * 0).is_(None))
    return and_(func.pg_typeof(value).op("IN")(literal_column(_PG_NUMBERS)),
                cast(value, Text).in_(["NaN", "Infinity", "-Infinity"]))


# -- diff -------------------------------------------------------------------------------------

@dataclass
class Diff:
    entered: int = 0
    exited: int = 0
    changed: int = 0
    unchanged_resent: int = 0
    sample_entered: list[str] = field(default_factory=list)
    sample_exited: list[str] = field(default_factory=list)


def compute_diff(conn: Connection, computation_id: int, resync: bool, staged: int,
                 previous: int, skipped: SkipCounts, compare_sent: bool = True,
                 carry_sent: bool = True) -> Diff:
    """Fill as_delta and as_exited from the stage and the current members.

    On PostgreSQL the stage has no key (one COPY into a bare table is the fastest load), so
    repeated user ids are found here, for free in the common case: with distinct ids,
    staged == previous - exited + entered, and as_delta's key rejects repeated new ids. Only
    when either check fails is the stage de-duplicated and the diff run again.
    Returns the diff; `skipped.duplicate` counts the repeated ids. Without `compare_sent`
    (an audience, whose calls only membership changes cause, or a stage and members holding
    nothing but user ids) entered users are a plain anti-join, and nobody can have changed.
    `carry_sent` says the members may hold contact traits that leaving users' calls carry.
    """
    if conn.dialect.name != "postgresql":
        return _diff(conn, computation_id, resync, compare_sent)
    savepoint = conn.begin_nested()
    try:
        diff = _diff(conn, computation_id, resync, compare_sent, carry_sent)
    except IntegrityError:
        savepoint.rollback()
    else:
        if staged == previous - diff.exited + diff.entered:
            savepoint.commit()
            return diff
        savepoint.rollback()
    skipped.duplicate += dedupe_stage(conn)
    return _diff(conn, computation_id, resync, compare_sent, carry_sent)


def _create_as(conn: Connection, name: str, query: Select[Any]) -> None:
    compiled = query.compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {name} AS {compiled}", compiled.params)


def _full_join(conn: Connection, computation_id: int, compare_sent: bool,
               carry_sent: bool) -> None:
    """PostgreSQL: as_delta and as_exited from one pass over the stage and the members.

    A hash full join reads each side once where a join each way (the way SQLite does it)
    reads both twice; only the rows that differ are kept, then split. The members' sent
    columns are read only when compared or carried by the calls of users who left.
    """
    m = t.members
    read_sent = compare_sent or carry_sent
    current = select(m.c.user_id, *(m.c[name] for name in SENT_COLUMNS if read_sent)) \
        .where(m.c.computation_id == computation_id).subquery("m")
    is_new = current.c.user_id.is_(None)
    differs = [stage.c[name].is_distinct_from(current.c[name])
               for name in SENT_COLUMNS if compare_sent]
    selection = select(
        stage.c.user_id, *(stage.c[name] for name in SENT_COLUMNS),
        is_new.label("is_new"),
        and_(~is_new, or_(false(), *differs)).label("is_changed"),
        and_(~is_new, stage.c.value.is_distinct_from(current.c.value)).label("value_changed")
        if compare_sent else false().label("value_changed"),
        current.c.user_id.label("old_user_id"),
        *((current.c[name] if read_sent else literal(None, Text)).label(f"old_{name}")
          for name in SENT_COLUMNS),
    ).select_from(stage.outerjoin(current, current.c.user_id == stage.c.user_id, full=True)) \
        .where(or_(stage.c.user_id.is_(None), is_new, *differs))
    _create_as(conn, joined.name, selection)
    _create_as(conn, delta.name, select(
        joined.c.user_id, *(joined.c[name] for name in SENT_COLUMNS),
        joined.c.is_new, joined.c.is_changed, joined.c.value_changed,
    ).where(joined.c.user_id.is_not(None)))
    _create_as(conn, exited.name, select(
        joined.c.old_user_id.label("user_id"),
        *(joined.c[f"old_{name}"].label(name) for name in SENT_COLUMNS),
    ).where(joined.c.user_id.is_(None)))


def _diff(conn: Connection, computation_id: int, resync: bool, compare_sent: bool,
          carry_sent: bool = True) -> Diff:
    """Fill as_delta and as_exited from the stage and the current members."""
    m = t.members
    member_of = and_(m.c.computation_id == computation_id, m.c.user_id == stage.c.user_id)
    differs = [stage.c[name].is_distinct_from(m.c[name]) for name in SENT_COLUMNS]
    is_new = m.c.user_id.is_(None)
    joined = stage.outerjoin(m, member_of)
    changed_expr = or_(*differs)
    selection = select(
        stage.c.user_id, *(stage.c[name] for name in SENT_COLUMNS),
        is_new.label("is_new"), and_(~is_new, changed_expr).label("is_changed"),
        and_(~is_new, stage.c.value.is_distinct_from(m.c.value)).label("value_changed"),
    ).select_from(joined)
    if not resync:
        selection = selection.where(or_(is_new, changed_expr))
        if not compare_sent:
            selection = select(
                stage.c.user_id, *(stage.c[name] for name in SENT_COLUMNS),
                true().label("is_new"), false().label("is_changed"),
                false().label("value_changed"),
            ).where(~exists().where(member_of))
    leaving = select(m.c.user_id, *(m.c[name] for name in SENT_COLUMNS)).where(
        m.c.computation_id == computation_id, ~exists().where(stage.c.user_id == m.c.user_id))
    if conn.dialect.name == "postgresql":
        if resync:
            _create_as(conn, delta.name, selection)
            _create_as(conn, exited.name, leaving)
        else:
            _full_join(conn, computation_id, compare_sent, carry_sent)
        # as_delta's key is what rejects a repeated new id (see compute_diff).
        conn.execute(text(f"ALTER TABLE {delta.name} ADD PRIMARY KEY (user_id)"))
        conn.execute(text(f"ANALYZE {delta.name}"))
        conn.execute(text(f"ANALYZE {exited.name}"))
    else:
        conn.execute(insert(delta).from_select(
            ["user_id", *SENT_COLUMNS, "is_new", "is_changed", "value_changed"], selection))
        conn.execute(insert(exited).from_select(["user_id", *SENT_COLUMNS], leaving))
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


# -- fan-out ----------------------------------------------------------------------------------

@dataclass
class FanDiff:
    """The users of an account audience's member accounts, against those last fanned out."""

    previous: int = 0
    users: int = 0
    entered: int = 0
    exited: int = 0
    changed: int = 0  # a trait's value changed (the user's account's, or their account)
    resent: int = 0  # a resync's unchanged users, sent again

    @property
    def sends(self) -> int:
        """Identify calls: every change, and a resync's every user."""
        return self.entered + self.exited + self.changed + self.resent

    @property
    def moves(self) -> int:
        """Track calls: entries, exits and new values."""
        return self.entered + self.exited + self.changed

    def per_call(self, accounts: int) -> dict[str, int]:
        """The outbox rows of each call: `accounts` rows of the accounts' own (group calls,
        Planhat companies: what an identify is to a user), the users' from the fan-out."""
        return {GROUP: accounts, "identify": self.sends, "track": self.moves}

    def as_dict(self) -> dict[str, int]:
        return {"users": self.users, "entered": self.entered, "exited": self.exited,
                "changed": self.changed}


def compute_fan_diff(conn: Connection, computation_id: int, resync: bool) -> FanDiff:
    """Fill as_fan, as_fan_delta and as_fan_exited from the stage (the member accounts, after
    compute_diff: one row per account), the staged account_users and fanout_members.

    A user is in the audience when any of their accounts is; the account that puts them in is
    the smallest id among them, and a trait's user takes that account's value. A user whose
    account changed while their value did not is in as_fan_delta with `sends` false: stored,
    not sent (only membership and value changes cause calls).
    """
    au, fm = account_users, t.fanout_members
    first = select(au.c.user_id, func.min(au.c.group_id).label("group_id")) \
        .select_from(au.join(stage, stage.c.user_id == au.c.group_id)) \
        .group_by(au.c.user_id).subquery("f")
    conn.execute(insert(fan).from_select(
        ["user_id", "group_id", "value"],
        select(first.c.user_id, first.c.group_id, stage.c.value)
        .select_from(first.join(stage, stage.c.user_id == first.c.group_id))))
    current = select(fm).where(fm.c.computation_id == computation_id).subquery("m")
    is_new = current.c.user_id.is_(None)
    value_changed = and_(~is_new, fan.c.value.is_distinct_from(current.c.value))
    sends = or_(is_new, value_changed, true() if resync else false())
    conn.execute(insert(fan_delta).from_select(
        ["user_id", "group_id", "value", "is_new", "value_changed", "sends"],
        select(fan.c.user_id, fan.c.group_id, fan.c.value, is_new, value_changed, sends)
        .select_from(fan.outerjoin(current, current.c.user_id == fan.c.user_id))
        .where(or_(sends, fan.c.group_id != current.c.group_id))))
    conn.execute(insert(fan_exited).from_select(
        ["user_id", "group_id", "value"],
        select(fm.c.user_id, fm.c.group_id, fm.c.value).where(
            fm.c.computation_id == computation_id,
            ~exists().where(fan.c.user_id == fm.c.user_id))))
    if conn.dialect.name == "postgresql":
        for table in (fan, fan_delta, fan_exited):
            conn.execute(text(f"ANALYZE {table.name}"))
    d = fan_delta.c
    counts = conn.execute(select(
        func.count().filter(d.is_new == true()),
        func.count().filter(d.value_changed == true()),
        func.count().filter(and_(d.sends == true(), d.is_new == false(),
                                 d.value_changed == false())),
    ).select_from(fan_delta)).one()
    diff = FanDiff(entered=int(counts[0]), changed=int(counts[1]), resent=int(counts[2]))
    diff.exited = int(conn.execute(select(func.count()).select_from(fan_exited)).scalar_one())
    diff.users = int(conn.execute(select(func.count()).select_from(fan)).scalar_one())
    diff.previous = int(conn.execute(select(func.count()).select_from(fm).where(
        fm.c.computation_id == computation_id)).scalar_one())
    return diff
