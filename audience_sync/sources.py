"""Source databases: read-only engines, streamed query results, and event rules compiled to SQL."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from operator import itemgetter
from typing import Any
from urllib.parse import quote, urlencode

from sqlalchemy import (
    ColumnElement,
    Connection,
    Date,
    DateTime,
    Engine,
    Select,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    event,
    func,
    inspect,
    select,
    table,
    text,
)
from sqlalchemy.engine import Inspector, make_url
from sqlalchemy.exc import ArgumentError, NoSuchTableError, SQLAlchemyError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.expression import TableClause, column

from audience_sync.config import Computation, Rule, Source
from audience_sync.errors import SourceError, describe_db_error
from audience_sync.messages import CONTACT_TRAITS, USER_ID_MAX
from audience_sync.urls import with_psycopg

CHUNK_ROWS = 10_000


# libpq's `options`: every session of a source runs read-only transactions. Appended to what
# the URL already sets (a search_path, a statement timeout), never in place of it; last wins.
_PG_READ_ONLY = "-c default_transaction_read_only=on"


def create_source_engine(url: str) -> Engine:
    """An engine that cannot write (see READ_ONLY_GUARDS), keeping every option of the URL."""
    try:
        return _create_source_engine(url)
    except ImportError as exc:  # the dialect's DBAPI driver is not installed
        backend = make_url(url).get_backend_name()
        raise SourceError(f"the {backend!r} driver is not installed ({exc.name or exc}): "
                          "install the package of its SQLAlchemy dialect") from exc
    except SQLAlchemyError as exc:  # e.g. an unknown dialect name
        raise SourceError(describe_db_error(exc)) from exc


def _driver_errors() -> tuple[type[BaseException], ...]:
    """What reading a source may raise. psycopg's only when it is loaded: a process that
    reads no PostgreSQL source cannot get one, and need not import it (start-up time)."""
    psycopg = sys.modules.get("psycopg")
    extra: tuple[type[BaseException], ...] = (psycopg.Error,) if psycopg is not None else ()
    return (SQLAlchemyError, sqlite3.Error, *extra)


def _create_source_engine(url: str) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_read_only(parsed.database or "", dict(parsed.query))
    if backend == "postgresql":
        parsed = with_psycopg(parsed)
        given = parsed.query.get("options")
        options = " ".join([*((given,) if isinstance(given, str) else given or ()),
                            _PG_READ_ONLY])
        return create_engine(parsed.update_query_dict({"options": options}),
                             poolclass=NullPool)
    if backend == "duckdb":
        # read_only: no write to the file; no external access: no COPY TO, ATTACH,
        # read_csv or extension downloads, so a query cannot touch any other file.
        engine = create_engine(parsed, poolclass=NullPool, connect_args={
            "read_only": True, "config": {"enable_external_access": False}})
        event.listen(engine, "connect", _duckdb_utc)
        return engine
    return create_engine(parsed, poolclass=NullPool)


# What a read-only source may do: read tables, call functions, recurse, begin/end the
# implicit read transaction, and the introspection PRAGMAs that reflection issues.
_ALLOWED_ACTIONS = frozenset((sqlite3.SQLITE_READ, sqlite3.SQLITE_SELECT,
                              sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
                              sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT))
_INTROSPECTION_PRAGMAS = frozenset((
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "database_list", "collation_list", "function_list", "pragma_list",
    "module_list", "compile_options"))
# PRAGMAs that do something even without an argument.
_ACTING_PRAGMAS = frozenset(("optimize", "wal_checkpoint", "incremental_vacuum",
                             "shrink_memory"))


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None,
               _trigger: str | None) -> int:
    """sqlite3 authorizer of a source connection: reads only, nothing attached.

    `mode=ro` already refuses writes to the source file; this also refuses what writes
    elsewhere: ATTACH (which creates files, and is how VACUUM INTO writes its copy), temp
    tables and any PRAGMA that sets something.
    """
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if (arg2 is None and name not in _ACTING_PRAGMAS) or name in _INTROSPECTION_PRAGMAS:
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _sqlite_read_only(database: str, query: dict[str, Any]) -> Engine:
    """A SQLite source opened as a `mode=ro` URI with an authorizer that refuses writes.

    The path is percent-escaped into the URI: a literal `%41` or `#` in a file name must name
    that file, not `A` or a fragment.
    """
    if database.startswith("file:"):  # already a URI: keep it, but read-only whatever it said
        base, _, _ = database.partition("?")
        params = {k: v for k, v in query.items() if k not in ("mode", "uri")}
    else:
        in_memory = database in ("", ":memory:")
        base = "file::memory:" if in_memory else "file:" + quote(database, safe="/")
        params = {}
    params["mode"] = "ro"
    uri = f"{base}?{urlencode(params)}"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.set_authorizer(_authorize)
        return conn

    return create_engine("sqlite://", creator=connect, poolclass=NullPool)


def _duckdb_utc(dbapi_connection: Any, _record: Any) -> None:
    """Naive timestamps mean UTC. Without DuckDB's ICU extension the time zone is UTC
    already and cannot be set; with it, it follows the machine unless told."""
    with contextlib.suppress(Exception):  # duckdb's error types: not imported without it
        dbapi_connection.execute("SET TimeZone = 'UTC'")


READ_ONLY_GUARDS = {
    "sqlite": "the file is opened read-only (mode=ro), ATTACH and writes refused",
    "postgresql": "every transaction is read-only (default_transaction_read_only)",
    "duckdb": "the file is opened read-only, with external access disabled",
}


def read_only_note(url: str) -> str | None:
    """None when this dialect's sessions are made read-only here; else what to do."""
    backend = make_url(url).get_backend_name()
    if backend in READ_ONLY_GUARDS:
        return None
    return (f"audience-sync cannot make a {backend!r} session read-only; it only ever issues "
            "the definitions' SELECTs, but connect with a read-only role")


def ping_source(source: Source) -> str | None:
    """None if the source answers, else a one-line reason."""
    try:
        engine = create_source_engine(source.url)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except SourceError as exc:
        return exc.message
    except SQLAlchemyError as exc:
        return describe_db_error(exc)
    return None


@dataclass(frozen=True)
class Proof:
    """What `check` learnt of one definition: the columns it returns, or why it cannot run."""

    comp: Computation
    columns: tuple[str, ...] = ()
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def prove_definitions(comps: Sequence[Computation], now: datetime) -> list[Proof]:
    """Prepare every definition's statement against its source, wrapped as a subquery with
    LIMIT 0 (the database plans it, names its columns and reads no row). A query without
    user_id, or a trait's without value, is a problem too. Definitions of an unreachable
    source are skipped (the source is reported once, by ping_source)."""
    proofs: list[Proof] = []
    engines: dict[str, Engine | None] = {}
    try:
        for comp in comps:
            if comp.source_name not in engines:
                engines[comp.source_name] = None if ping_source(comp.source) is not None \
                    else create_source_engine(comp.source.url)
            engine = engines[comp.source_name]
            if engine is not None:
                proofs.append(_prove(comp, engine, now))
    finally:
        for engine in engines.values():
            if engine is not None:
                engine.dispose()
    return proofs


def prove_account_users(source: Source, now: datetime) -> tuple[tuple[str, ...], str | None]:
    """check: a source's account_users query, prepared with LIMIT 0; (its columns, None) or
    ((), why it cannot run). The source must be reachable (ping_source)."""
    assert source.account_users is not None
    engine = create_source_engine(source.url)
    try:
        with engine.connect() as conn:
            names = tuple(conn.execute(_limit_zero(source.account_users),
                                       {"now": bind_now(engine.dialect.name, now)}).keys())
    except _driver_errors() as exc:
        return (), describe_db_error(exc)
    finally:
        engine.dispose()
    try:
        _account_user_positions(names)
    except ValueError as exc:
        return names, f"account_users {exc}"
    return names, None


def _limit_zero(query: str) -> TextClause:
    """A query as the user wrote it (less a trailing semicolon), wrapped so the database plans
    it and names its columns without reading a row."""
    return text(f"SELECT * FROM ({query.strip().rstrip(';')}) AS proof LIMIT 0")


def _prove(comp: Computation, engine: Engine, now: datetime) -> Proof:
    try:
        with engine.connect() as conn:
            statement, params = computation_statement(comp, engine, now, conn)
            if isinstance(statement, TextClause):
                probe: Any = _limit_zero(statement.text)
            else:
                probe = select(statement.subquery("proof")).limit(0)
            names = list(conn.execute(probe, params).keys())
        _positions(comp, names)
    except SourceError as exc:
        message = exc.message
        prefix = f"{comp.path} ({comp.key}): "
        return Proof(comp, problem=message[len(prefix):] if message.startswith(prefix)
                     else message)
    except _driver_errors() as exc:
        return Proof(comp, problem=describe_db_error(exc))
    return Proof(comp, columns=tuple(names))


# -- values ---------------------------------------------------------------------------------------

def canonical_json(value: Any) -> str:
    """One text per value, whatever the driver returned: no false changes from formatting.

    :raises ValueError: the value holds a NaN or an infinity, which JSON cannot carry.
    """
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("not a finite number")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass
class SkipCounts:
    """Rows dropped from a snapshot, per reason."""

    null: int = 0
    empty: int = 0
    too_long: int = 0
    duplicate: int = 0
    bad_type: int = 0  # a user id that is neither text nor an integer (a BLOB, 1.5, ...)
    non_finite: int = 0  # a computed trait's value that is NaN or an infinity

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def as_dict(self) -> dict[str, int]:
        return {"null": self.null, "empty": self.empty, "too_long": self.too_long,
                "duplicate": self.duplicate, "bad_type": self.bad_type,
                "non_finite": self.non_finite}


def _ids_all_valid(rows: list[Any]) -> bool:
    """One check per chunk, each step a C loop: the common case needs no per-row Python."""
    if not rows:
        return True
    ids = [row[0] for row in rows]
    return (set(map(type, ids)) == {str} and all(ids) and not any(map(str.isspace, ids))
            and max(map(len, ids)) <= USER_ID_MAX)


def _id_text(user_id: Any) -> str | None:
    """The text of a non-text user id, or None when it is not an id at all.

    Integers (and integral numbers a driver returned as float or Decimal) and UUIDs have one
    spelling; bytes, fractions, booleans or dates do not (b'blob' is not a user id).
    """
    if isinstance(user_id, bool):
        return None
    if isinstance(user_id, int | uuid.UUID):
        return str(user_id)
    if isinstance(user_id, float | Decimal):
        try:
            if user_id == int(user_id):
                return str(int(user_id))
        except (OverflowError, ValueError):  # infinities and NaN
            return None
    return None


def _drop_bad_ids(rows: list[Any], skipped: SkipCounts) -> list[Any]:
    good = []
    for row in rows:
        user_id = row[0]
        if user_id is None:
            skipped.null += 1
            continue
        if type(user_id) is not str:
            user_id = _id_text(user_id)
            if user_id is None:
                skipped.bad_type += 1
                continue
            row = (user_id, *row[1:])
        if not user_id or user_id.isspace():
            skipped.empty += 1
        elif len(user_id) > USER_ID_MAX:
            skipped.too_long += 1
        else:
            good.append(row)
    return good


def _json_values(rows: list[Any], skipped: SkipCounts) -> list[tuple[Any, ...]]:
    """Rows with the value (last) as canonical JSON; NaN and infinities dropped and counted."""
    out = []
    for row in rows:
        try:
            out.append((*row[:-1], canonical_json(row[-1])))
        except ValueError:
            skipped.non_finite += 1
    return out


# -- queries --------------------------------------------------------------------------------------

def bind_now(engine_dialect: str, now: datetime) -> Any:
    """`:now` as the source compares it: ISO-8601 text on SQLite, a timestamptz elsewhere."""
    return now.astimezone(UTC).isoformat() if engine_dialect == "sqlite" else now


def computation_statement(comp: Computation, engine: Engine, now: datetime,
                          connection: Connection | None = None) \
        -> tuple[Select[Any] | TextClause, dict[str, Any]]:
    """The statement that yields the snapshot, and its parameters. A builder definition
    reads its tables' columns through `connection` when given (else one of its own)."""
    if comp.query is not None:
        return text(comp.query), {"now": bind_now(engine.dialect.name, now)}
    if comp.definition is not None:
        from audience_sync.compiler import compile_definition  # it builds on this module

        return compile_definition(comp.definition, comp.source, engine, now, connection), {}
    assert comp.rule is not None
    try:
        return compile_rule(comp.rule, comp.source, engine, now), {}
    except SourceError as exc:
        raise SourceError(f"{comp.path} ({comp.key}): {exc.message}") from exc


class SourceRows:
    """The rows of one evaluation, streamed from the source in chunks of plain tuples.

    `columns` names what each tuple holds: user_id first, then only the contact traits the
    query returned, then (traits) the canonical JSON value; it is known once iteration started.
    Null, empty, over-long and non-text user ids, and non-finite values, are counted and
    dropped here; duplicates where the rows land (the staging table's primary key).
    """

    def __init__(self, comp: Computation, engine: Engine, now: datetime,
                 skipped: SkipCounts) -> None:
        self.comp = comp
        self.engine = engine
        self.now = now
        self.skipped = skipped
        self.columns: tuple[str, ...] = ("user_id",)

    def __iter__(self) -> Iterator[list[tuple[Any, ...]]]:
        comp = self.comp
        try:
            with self.engine.connect() as conn:
                # On the connection that runs it: one connection per run (a DuckDB open
                # costs more than reading a definition's columns).
                statement, params = computation_statement(comp, self.engine, self.now, conn)
                names, fetch = _open_cursor(conn, statement, params)
                positions, self.columns = _positions(comp, names)
                extras = _account_trait_columns(comp, names)
                if extras:
                    pick = _with_account_traits(positions, extras)
                elif positions == [0] and len(names) == 1:
                    pick = None
                elif len(positions) == 1:
                    only = positions[0]
                    pick = lambda row: (row[only],)  # noqa: E731
                else:
                    pick = itemgetter(*positions)
                has_value = self.columns[-1] == "value"
                decode = _value_decoder(comp)
                while chunk := fetch():
                    rows = list(chunk) if pick is None else [pick(row) for row in chunk]
                    if not _ids_all_valid(rows):
                        rows = _drop_bad_ids(rows, self.skipped)
                    if has_value and decode is not None:
                        rows = [(*row[:-1], decode(row[-1])) for row in rows]
                    if has_value:
                        rows = _json_values(rows, self.skipped)
                    yield rows
        except _driver_errors() as exc:
            raise SourceError(f"{comp.path} ({comp.key}): source {comp.source_name!r} query "
                              f"failed: {describe_db_error(exc)}") from exc


class AccountUsers:
    """The rows of a source's `account_users:` query, `(user_id, group_id)` tuples streamed in
    chunks: the users each account audience is fanned out to. Rows whose user or account id
    is null, empty, over-long or not an id are counted in `skipped` and dropped."""

    def __init__(self, comp: Computation, engine: Engine, now: datetime) -> None:
        assert comp.source.account_users is not None
        self.comp = comp
        self.query = comp.source.account_users
        self.engine = engine
        self.now = now
        self.skipped = 0

    def __iter__(self) -> Iterator[list[tuple[Any, ...]]]:
        comp = self.comp
        where = f"source {comp.source_name!r} account_users"
        try:
            with self.engine.connect() as conn:
                names, fetch = _open_cursor(conn, text(self.query),
                                            {"now": bind_now(self.engine.dialect.name,
                                                             self.now)})
                try:
                    pick = itemgetter(*_account_user_positions(names))
                except ValueError as exc:
                    raise SourceError(f"{comp.path} ({comp.key}): {where} {exc}") from None
                while chunk := fetch():
                    rows = [pick(row) for row in chunk]
                    if not _ids_all_valid(rows) or not _ids_all_valid(
                            [(g,) for _, g in rows]):
                        rows = self._valid(rows)
                    yield rows
        except _driver_errors() as exc:
            raise SourceError(f"{comp.path} ({comp.key}): {where} query failed: "
                              f"{describe_db_error(exc)}") from exc

    def _valid(self, rows: list[Any]) -> list[tuple[Any, ...]]:
        """The rows whose user id and then account id (each checked first in its row) are
        ids, both as text."""
        counts = SkipCounts()
        users = _drop_bad_ids(rows, counts)
        both = _drop_bad_ids([(g, u) for u, g in users], counts)
        self.skipped += counts.total
        return [(user, group) for group, user in both]


def _account_user_positions(names: Sequence[str]) -> tuple[int, int]:
    """Where user_id and group_id sit in an account_users query's rows.

    :raises ValueError: one is missing (the message names the columns it has).
    """
    lowered = [n.lower() for n in names]
    if "user_id" not in lowered or "group_id" not in lowered:
        raise ValueError(f"must return user_id and group_id columns (columns: "
                         f"{', '.join(names) or 'none'})")
    return lowered.index("user_id"), lowered.index("group_id")


def _value_decoder(comp: Computation) -> Callable[[Any], Any] | None:
    from audience_sync.compiler import value_decoder

    return value_decoder(comp.definition)


def _open_cursor(conn: Connection, statement: Select[Any] | TextClause, params: dict[str, Any]) \
        -> tuple[list[str], Callable[[], Sequence[Any]]]:
    """Execute on the driver's own cursor: plain tuples, no per-row objects in between.

    PostgreSQL gets a server-side cursor so a large result streams instead of landing in memory.
    Other drivers go through SQLAlchemy's streaming result.
    """
    dialect = conn.dialect
    if dialect.name in ("sqlite", "postgresql"):
        compiled = statement.compile(dialect=dialect)
        values = compiled.construct_params(params)
        raw: Any = conn.connection.driver_connection
        if dialect.name == "postgresql":
            cursor = raw.cursor(name=f"audience_sync_{uuid.uuid4().hex[:12]}")
            cursor.itersize = CHUNK_ROWS
            cursor.execute(str(compiled), values)
        else:
            cursor = raw.cursor()
            cursor.execute(str(compiled), [values[name] for name in compiled.positiontup or ()])
        names = [d[0] for d in cursor.description or ()]
        return names, lambda: cursor.fetchmany(CHUNK_ROWS)
    result = conn.execution_options(stream_results=True, yield_per=CHUNK_ROWS) \
        .execute(statement, params)
    partitions = result.partitions(CHUNK_ROWS)
    return list(result.keys()), lambda: next(partitions, [])


# An account definition's columns that are not account traits.
ACCOUNT_COLUMNS = frozenset(("group_id", "user_id", "value", *CONTACT_TRAITS))
# Where the account traits go in a staged row (_positions, _with_account_traits).
_TRAITS_SLOT = -1


def _account_trait_columns(comp: Computation, names: Sequence[str]) -> list[tuple[str, int]]:
    """An account definition's other columns (plan, seats, ...): its account traits, by name
    and position; none for a user definition."""
    if comp.level != "account":
        return []
    return [(name, i) for i, name in enumerate(names) if name.lower() not in ACCOUNT_COLUMNS]


def account_traits_json(values: dict[str, Any]) -> str:
    """The account traits as canonical JSON; a value JSON cannot carry (NaN) is null."""
    plain: dict[str, Any] = {}
    for name, value in values.items():
        try:
            plain[name] = json.loads(canonical_json(value))
        except ValueError:  # NaN, an infinity
            plain[name] = None
        except TypeError:  # a type JSON has no form for: its text
            plain[name] = str(value)
    return canonical_json(plain)


def _with_account_traits(positions: list[int],
                         extras: list[tuple[str, int]]) -> Callable[[Any], tuple[Any, ...]]:
    def pick(row: Any) -> tuple[Any, ...]:
        return tuple(account_traits_json({name: row[i] for name, i in extras})
                     if p == _TRAITS_SLOT else row[p] for p in positions)
    return pick


def _positions(comp: Computation, names: list[str]) -> tuple[list[int], tuple[str, ...]]:
    """Where user_id, the contact traits present and the value sit in the query's rows (an
    account definition's other columns, its account traits, become one JSON `traits`)."""
    lowered = [c.lower() for c in names]
    key = "group_id" if comp.level == "account" else "user_id"
    if key not in lowered:
        raise SourceError(f"{comp.path} ({comp.key}): the query returned no {key} column "
                          f"(columns: {', '.join(names) or 'none'})"
                          + (" (an account audience's query returns group_id: the account's "
                             "id)" if key == "group_id" else ""))
    positions = [lowered.index(key), *(lowered.index(c) for c in CONTACT_TRAITS
                                       if c in lowered)]
    wanted = ["user_id", *(c for c in CONTACT_TRAITS if c in lowered)]
    if key == "group_id" and "user_id" in lowered:
        # An account's user_id: the user its group calls name.
        positions.append(lowered.index("user_id"))
        wanted.append("user_ref")
    if _account_trait_columns(comp, names):
        positions.append(_TRAITS_SLOT)
        wanted.append("traits")
    if comp.kind == "trait":
        if "value" not in lowered:
            raise SourceError(f"{comp.path} ({comp.key}): a computed trait's query must return "
                              f"{key} and value columns")
        positions.append(lowered.index("value"))
        wanted.append("value")
    return positions, tuple(wanted)


# -- rules ----------------------------------------------------------------------------------------

def compile_rule(rule: Rule, source: Source, engine: Engine, now: datetime) -> Select[Any]:
    """An Engage-style event rule over Segment's warehouse schema, as SQLAlchemy Core."""
    cols = source.columns
    tracks = _reflect(engine, segment_table(source, source.tables.tracks),
                      (cols.user_id, cols.event, cols.timestamp))
    # The users table is part of the definition (its contact traits travel with every call,
    # and not_performed counts its users): a source that lost it fails the run rather than
    # silently sending members without their email.
    users = _reflect(engine, segment_table(source, source.tables.users), (cols.users_id,))
    start = now - rule.within
    ts = tracks.c[cols.timestamp]
    in_window = and_(
        tracks.c[cols.event] == rule.event,
        _ts_after(ts, start, engine, inclusive=False),
        _ts_after(ts, now, engine, inclusive=True, before=True),
    )
    trait_columns = [users.c[c].label(label) for c, label in
                     ((cols.email, "email"), (cols.name, "name"), (cols.title, "title"))
                     if c in users.c]
    if rule.not_performed:
        # An anti-join against who did it, not a correlated NOT EXISTS: SQLite runs the
        # latter once per user over the event's whole history (44 s for the demo's 5,000).
        performed = select(tracks.c[cols.user_id].label("user_id")).where(in_window) \
            .distinct().subquery("performed")
        return select(users.c[cols.users_id].label("user_id"), *trait_columns).select_from(
            users.outerjoin(performed, performed.c.user_id == users.c[cols.users_id])
        ).where(performed.c.user_id.is_(None))
    counted = (
        select(tracks.c[cols.user_id].label("user_id"))
        .where(in_window)
        .group_by(tracks.c[cols.user_id])
        .having(func.count() >= rule.at_least)
    )
    if rule.at_most is not None:
        counted = counted.having(func.count() <= rule.at_most)
    sub = counted.subquery("qualified")
    return select(sub.c.user_id, *trait_columns).select_from(
        sub.outerjoin(users, users.c[cols.users_id] == sub.c.user_id))


# Text that names its own zone after the time of day: Z, +hh[:mm], -hh[:mm] or a zone name
# ("UTC", "America/New_York"); anything else is naive and means UTC.
_PG_TEXT_HAS_ZONE = r"\d:\d\d(:\d\d)?([.,]\d+)?\s*([zZ]|[+-]\d|[A-Za-z]{3})"


def _ts_after(ts: ColumnElement[Any], bound: datetime, engine: Engine, *, inclusive: bool,
              before: bool = False) -> ColumnElement[bool]:
    """Compare a native or ISO-8601 text timestamp column with an aware datetime.

    A timestamp without a zone (a naive column, or text without an offset) means UTC, whatever
    the session's TimeZone: on PostgreSQL comparing a naive value with a timestamptz would
    read it in the session's zone, so each kind of column gets a bound of its own kind.
    """
    utc = bound.astimezone(UTC)
    if engine.dialect.name == "sqlite":
        # julianday() reads every ISO-8601 spelling (T or space, Z or offset, fractions) and
        # takes text without an offset as UTC.
        left: ColumnElement[Any] = func.julianday(ts)
        right: ColumnElement[Any] = func.julianday(utc.isoformat())
    elif isinstance(ts.type, DateTime) and ts.type.timezone:
        left = ts
        right = bindparam(None, utc, type_=DateTime(timezone=True), unique=True)
    elif isinstance(ts.type, DateTime | Date):
        # Naive on both sides: no conversion through the session's TimeZone.
        left = ts if isinstance(ts.type, DateTime) else cast(ts, DateTime(timezone=False))
        right = bindparam(None, utc.replace(tzinfo=None), type_=DateTime(timezone=False),
                          unique=True)
    elif engine.dialect.name == "postgresql":
        # Text: an explicit zone is honoured; without one, the wall time is read as UTC.
        left = case((ts.regexp_match(_PG_TEXT_HAS_ZONE), cast(ts, DateTime(timezone=True))),
                    else_=func.timezone("UTC", cast(ts, DateTime(timezone=False))))
        right = bindparam(None, utc, type_=DateTime(timezone=True), unique=True)
    else:
        left = cast(ts, DateTime(timezone=True))
        right = bindparam(None, utc, type_=DateTime(timezone=True), unique=True)
    if before:
        return left <= right if inclusive else left < right
    return left >= right if inclusive else left > right


def segment_table(source: Source, name: str) -> str:
    """A Segment table's name as the source spells it: `schema.table` as given, or qualified
    by the source's `schema:`."""
    return name if "." in name or not source.db_schema else f"{source.db_schema}.{name}"


def _reflect(engine: Engine, name: str, needed: tuple[str, ...]) -> TableClause:
    found = table_columns(inspect(engine), name)
    if found is None:
        raise SourceError(f"the source has no table {name!r} (set tables: in the source config)")
    missing = [c for c in needed if c not in found.c]
    if missing:
        raise SourceError(f"table {name!r} has no column {missing[0]!r} "
                          "(set columns: in the source config)")
    return found


def table_columns(inspector: Inspector, name: str) -> TableClause | None:
    """The table `name` (`schema.table` or `table`) with its columns and their types, nothing
    more: constraint and index reflection is slow on warehouses and unsupported by some
    dialects (DuckDB's). None when the source has no such table."""
    schema, _, table_name = name.rpartition(".")
    try:
        columns = inspector.get_columns(table_name, schema=schema or None)
    except NoSuchTableError:
        return None
    except SQLAlchemyError as exc:
        raise SourceError(f"cannot read table {name!r}: {describe_db_error(exc)}") from exc
    if not columns:
        return None
    return table(table_name, *(column(c["name"], c["type"]) for c in columns),
                 schema=schema or None)


# -- compile and preview: what a definition runs, and who it selects (nothing written) ---------

@dataclass(frozen=True)
class CompiledSql:
    sql: str
    unbound: dict[str, Any]  # values the dialect cannot write as literals, listed beside
    dialect: str


@dataclass(frozen=True)
class Preview:
    columns: tuple[str, ...]
    count: int
    sample: list[tuple[Any, ...]]  # the smallest ids: the same sample for the same result
    skipped: SkipCounts


def compiled_sql(comp: Computation, now: datetime) -> CompiledSql:
    """The SQL a definition runs on its source, its values written in where the dialect can
    render them as literals."""
    engine = create_source_engine(comp.source.url)
    try:
        statement, params = computation_statement(comp, engine, now)
        if isinstance(statement, TextClause):
            for key, value in params.items():
                with contextlib.suppress(ArgumentError):  # a query need not use :now
                    statement = statement.bindparams(**{key: value})
        try:
            literal = statement.compile(dialect=engine.dialect,
                                        compile_kwargs={"literal_binds": True})
            return CompiledSql(str(literal), {}, engine.dialect.name)
        except (SQLAlchemyError, NotImplementedError, TypeError, ValueError):
            compiled = statement.compile(dialect=engine.dialect)
            return CompiledSql(str(compiled), dict(compiled.params), engine.dialect.name)
    except SQLAlchemyError as exc:
        raise SourceError(f"{comp.path} ({comp.key}): {describe_db_error(exc)}") from exc
    finally:
        engine.dispose()


def preview(comp: Computation, now: datetime, limit: int) -> Preview:
    """Run a definition on its source: how many distinct users, and a sample of `limit`."""
    import heapq

    engine = create_source_engine(comp.source.url)
    skipped = SkipCounts()
    rows = SourceRows(comp, engine, now, skipped)
    seen: set[str] = set()
    sample: list[tuple[Any, ...]] = []
    try:
        for chunk in rows:
            fresh = [row for row in chunk if row[0] not in seen]
            skipped.duplicate += len(chunk) - len(fresh)
            seen.update(row[0] for row in fresh)
            sample = heapq.nsmallest(limit, [*sample, *fresh], key=lambda row: row[0])
    finally:
        engine.dispose()
    return Preview(rows.columns, len(seen), sample, skipped)
