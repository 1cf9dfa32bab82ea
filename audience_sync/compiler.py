"""Builder definitions compiled to one SQLAlchemy Core SELECT for the source's dialect.

Each condition becomes a set of user ids (a SELECT of `user_id`), combined with INTERSECT,
UNION and EXCEPT; only negative forms (`at_most`, `exactly: 0`, `none`, `not_exists` traits)
read the universe (`users.id` with every non-null `tracks.user_id`), and trait conditions of
the top-level `all` filter the join that fetches contact traits, so a common audience costs
what a hand-written query does (bench/bench_builder.py). Sets never hold a null id, so no
three-valued logic leaks into NOT. Window bounds are bound parameters computed from the run's
clock: no dialect-specific "now". Timestamps may be native (naive means UTC) or ISO-8601 text.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Connection,
    DateTime,
    Double,
    Engine,
    FromClause,
    Interval,
    Select,
    String,
    bindparam,
    cast,
    except_,
    false,
    func,
    inspect,
    intersect,
    literal_column,
    select,
    text,
    union,
)
from sqlalchemy.engine import Inspector
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.sql.expression import TableClause, column, table
from sqlalchemy.types import NullType

from audience_sync.builder import (
    Compute,
    Condition,
    Definition,
    EventCondition,
    Filter,
    Funnel,
    FunnelStep,
    Group,
    Inlined,
    QueryAudience,
    TraitCondition,
    Window,
)
from audience_sync.config import Source
from audience_sync.errors import SourceError
from audience_sync.messages import CONTACT_TRAITS
from audience_sync.sources import bind_now, segment_table, table_columns

Set = Select[Any] | CompoundSelect[Any]


def event_table_name(event: str) -> str:
    """Segment's table for an event: `Order Completed` -> `order_completed`."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", event)
    return re.sub(r"[^a-z0-9]+", "_", spaced.lower()).strip("_")


def compile_definition(definition: Definition, source: Source, engine: Engine,
                       now: datetime, connection: Connection | None = None) -> Select[Any]:
    """`SELECT user_id [, contact traits]` for an audience's where:, `SELECT user_id, value`
    for a compute: trait."""
    compiler = _Compiler(source, engine, now, connection)
    try:
        if isinstance(definition, Compute):
            return compiler.trait(definition)
        return compiler.audience(definition)
    finally:
        compiler.close()


def value_decoder(definition: Definition | None) -> Callable[[Any], Any] | None:
    """How a trait's raw value becomes its JSON value, when the driver does not say it:
    SQLite returns unique_list as JSON text, and no dialect promises the order of a list
    aggregate, so lists are sorted here."""
    if not isinstance(definition, Compute) or definition.kind != "unique_list":
        return None

    def decode(value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value)
        return sorted(v for v in value if v is not None) if value is not None else None

    return decode


# PostgreSQL type OIDs of timestamp (naive) and timestamptz, as psycopg's description gives them.
_PG_TIMESTAMP, _PG_TIMESTAMPTZ = 1114, 1184


def _probed_type(dialect: str, code: Any) -> Any:
    if dialect == "postgresql":
        naive, aware = code == _PG_TIMESTAMP, code == _PG_TIMESTAMPTZ
    else:  # DuckDB's type objects print as their SQL names
        name = str(code).upper()
        aware = name == "TIMESTAMP WITH TIME ZONE"
        naive = name.startswith("TIMESTAMP") and not aware
    if aware:
        return DateTime(timezone=True)
    return DateTime() if naive else NullType()


def _all_parts(cond: Condition) -> Iterator[Condition]:
    """The conditions an `all` (with its nested `all`s and inlined audiences) requires."""
    if isinstance(cond, Inlined):
        yield from _all_parts(cond.condition)
    elif isinstance(cond, Group) and cond.kind == "all":
        for part in cond.conditions:
            yield from _all_parts(part)
    else:
        yield cond


@dataclass(frozen=True)
class _AllBut:
    """Every user of the universe but these."""

    excluded: Set


class _Compiler:
    def __init__(self, source: Source, engine: Engine, now: datetime,
                 connection: Connection | None) -> None:
        self.source = source
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.now = now.astimezone(UTC)
        self.cols = source.columns
        self._tables: dict[str, TableClause | None] = {}  # read once per definition
        self._connection = connection
        self._own_connection = connection is None
        self._inspector: Inspector | None = None
        self._ctes = 0
        self._universe: Select[Any] | None = None

    # -- tables -----------------------------------------------------------------------------

    def _table(self, name: str) -> TableClause | None:
        qualified = segment_table(self.source, name)
        if qualified not in self._tables:
            self._tables[qualified] = self._reflect(qualified)
        return self._tables[qualified]

    def _reflect(self, name: str) -> TableClause | None:
        """A table's columns and their types, nothing more (constraint and index reflection
        is slow on warehouses), through one connection and inspector for the whole
        definition: on PostgreSQL an inspector's first table costs ~15 ms, the next ~1.5."""
        if self._connection is None:
            self._connection = self.engine.connect()  # closed by close()
        schema, _, table_name = name.rpartition(".")
        probed = self._probe(table_name, schema or None)
        if probed is not None:
            return probed
        if self._inspector is None:
            self._inspector = inspect(self._connection)
        return table_columns(self._inspector, name)

    def _probe(self, table_name: str, schema: str | None) -> TableClause | None:
        """PostgreSQL and DuckDB: the columns from an empty SELECT's cursor description, in
        ~1 ms, where the inspector's catalog queries take ~20 ms a table on PostgreSQL and
        ~40 ms on DuckDB. Only timestamp types matter here; None: ask the inspector."""
        assert self._connection is not None
        dialect = self.engine.dialect.name
        if dialect not in ("postgresql", "duckdb"):
            return None
        everything = table(table_name, schema=schema)
        empty: Select[Any] = select(literal_column("*")).select_from(everything).where(false())
        try:
            result = self._connection.execute(empty)
            description = result.cursor.description if result.cursor is not None else None
            result.close()
        except SQLAlchemyError:
            self._connection.rollback()  # a PostgreSQL transaction is unusable after an error
            return None
        if not description:
            return None
        return table(table_name, *(column(d[0], _probed_type(dialect, d[1]))
                                   for d in description), schema=schema)

    def close(self) -> None:
        if self._own_connection and self._connection is not None:
            self._connection.close()

    def _need(self, name: str, columns: tuple[str, ...], what: str) -> TableClause:
        found = self._table(name)
        qualified = segment_table(self.source, name)
        if found is None:
            raise SourceError(f"{what}: the source has no table {qualified!r}")
        for col in columns:
            if col not in found.c:
                raise SourceError(f"{what}: table {qualified!r} has no column {col!r}")
        return found

    def tracks(self) -> TableClause:
        return self._need(self.source.tables.tracks, (self.cols.user_id, self.cols.event,
                                                      self.cols.timestamp), "events")

    def users(self) -> TableClause | None:
        found = self._table(self.source.tables.users)
        return found if found is not None and self.cols.users_id in found.c else None

    def event_rows(self, event: str, window: Window, filters: tuple[Filter, ...],
                   prop: str | None = None) -> tuple[TableClause, list[ColumnElement[bool]]]:
        """The table an event's rows live in and the clauses picking the qualifying ones:
        the event's own table when properties matter, else `tracks`."""
        cols = self.cols
        if filters or prop:
            name = self.source.tables.events.get(event) or event_table_name(event)
            needed = (cols.user_id, cols.timestamp, *(f.field for f in filters),
                      *((prop,) if prop else ()))
            table = self._need(name, needed, f"event {event!r}")
            clauses = [self.predicate(table.c[f.field], f) for f in filters]
            if prop:
                clauses.append(table.c[prop].is_not(None))
        else:
            table = self.tracks()
            clauses = [table.c[cols.event] == bindparam("event", event, unique=True)]
        clauses.append(table.c[cols.user_id].is_not(None))
        clauses += self.window(table.c[cols.timestamp], window)
        return table, clauses

    # -- time -------------------------------------------------------------------------------

    def window(self, ts: ColumnElement[Any], window: Window) -> list[ColumnElement[bool]]:
        if window.start is None:
            return []
        return [self._compare(ts, ">", self.now - window.start, "window_start"),
                self._compare(ts, "<=", self.now - window.end, "window_end")]

    def _compare(self, ts: ColumnElement[Any], op: str, at: datetime, name: str) \
            -> ColumnElement[bool]:
        if self.sqlite:
            # julianday() reads every ISO-8601 spelling (T or space, Z or offset, fractions).
            left: ColumnElement[Any] = func.julianday(ts)
            right: ColumnElement[Any] = func.julianday(
                bindparam(name, at.isoformat(), type_=String, unique=True))
        elif isinstance(ts.type, DateTime) and not ts.type.timezone:
            # A naive column holds UTC: compare it with naive UTC, whatever the session's zone.
            left = ts
            right = bindparam(name, at.replace(tzinfo=None), type_=DateTime(), unique=True)
        else:
            left = ts if isinstance(ts.type, DateTime) else cast(ts, DateTime(timezone=True))
            right = bindparam(name, at, type_=DateTime(timezone=True), unique=True)
        return left > right if op == ">" else left <= right

    def instant(self, ts: ColumnElement[Any]) -> ColumnElement[Any]:
        """A timestamp comparable across tables of different column types."""
        if self.sqlite:
            return func.julianday(ts)
        if isinstance(ts.type, DateTime):
            return ts if ts.type.timezone else func.timezone("UTC", ts)
        return cast(ts, DateTime(timezone=True))

    def _within_after(self, later: ColumnElement[Any], earlier: ColumnElement[Any],
                      within: timedelta | None) -> list[ColumnElement[bool]]:
        clauses = [later > earlier]
        if within is None:
            return clauses
        if self.sqlite:
            # Whole milliseconds: julianday() is exact to the millisecond, its float sums not.
            gap = func.round((later - earlier) * literal_column("86400000.0"))
            clauses.append(gap <= bindparam("within_ms", int(within.total_seconds() * 1000),
                                            unique=True))
        else:
            clauses.append(later <= earlier + bindparam("within", within, type_=Interval(),
                                                        unique=True))
        return clauses

    # -- filters ----------------------------------------------------------------------------

    def predicate(self, col: ColumnElement[Any], f: Filter) -> ColumnElement[bool]:
        """A null never satisfies a comparison (SQL's own rule in a WHERE); only not_exists."""
        def value(v: Any) -> Any:
            return bindparam("value", v, unique=True)

        op = f.op
        if op == "exists":
            return col.is_not(None)
        if op == "not_exists":
            return col.is_(None)
        if op in ("in", "not_in"):
            # One parameter per item, not an expanding IN: the statement runs on the raw cursor.
            items = [value(v) for v in f.value]
            return col.in_(items) if op == "in" else col.not_in(items)
        if op in ("contains", "starts_with"):
            if self.sqlite:  # SQLite's LIKE ignores case; instr() does not
                found = func.instr(col, value(f.value))
                return found > 0 if op == "contains" else found == 1
            like: ColumnElement[bool] = col.contains(f.value, autoescape=True) \
                if op == "contains" else col.startswith(f.value, autoescape=True)
            return like
        right = value(f.value)
        compared: dict[str, ColumnElement[bool]] = {
            "=": col == right, "!=": col != right, ">": col > right, ">=": col >= right,
            "<": col < right, "<=": col <= right}
        return compared[op]

    # -- sets of user ids ---------------------------------------------------------------------

    def _plain(self, s: Set) -> Select[Any]:
        """A set as a plain SELECT. SQLite rejects a compound inside another compound, and its
        parser gives up on deep nesting: a nested compound is read from a named CTE, which
        keeps the statement flat however deep the definition."""
        if isinstance(s, CompoundSelect):
            self._ctes += 1
            return select(s.cte(f"set_{self._ctes}").c.user_id)
        return s

    def universe(self) -> Select[Any]:
        """Every user: one CTE, however many negations read it."""
        if self._universe is None:
            tracks = self.tracks()
            uid = tracks.c[self.cols.user_id]
            everyone: Set = select(uid.label("user_id")).where(uid.is_not(None)).distinct()
            users = self.users()
            if users is not None:
                ids = users.c[self.cols.users_id]
                everyone = union(select(ids.label("user_id")).where(ids.is_not(None)),
                                 select(uid.label("user_id")).where(uid.is_not(None)))
            self._universe = select(everyone.cte("universe").c.user_id)
        return self._universe

    def everyone_but(self, excluded: Set) -> Set:
        return except_(self.universe(), self._plain(excluded))

    def condition(self, cond: Condition) -> Set:
        found = self.term(cond)
        return self.everyone_but(found.excluded) if isinstance(found, _AllBut) else found

    def _combine(self, kind: str, sets: list[Set]) -> Set:
        parts = [self._plain(s) for s in sets]
        if len(parts) == 1:
            return parts[0]
        return intersect(*parts) if kind == "all" else union(*parts)

    def term(self, cond: Condition) -> Set | _AllBut:
        """A condition's set, or "everyone but" a set, left symbolic so that `all` subtracts
        it from its positive parts (and `none` of it is the set itself) without reading the
        universe."""
        if isinstance(cond, Inlined):
            return self.term(cond.condition)
        if isinstance(cond, Group):
            terms = [self.term(c) for c in cond.conditions]
            positive = [t for t in terms if not isinstance(t, _AllBut)]
            excluded = [t.excluded for t in terms if isinstance(t, _AllBut)]
            if cond.kind == "all":
                if not excluded:
                    return self._combine("all", positive)
                if not positive:
                    return _AllBut(self._combine("any", excluded))
                return except_(self._plain(self._combine("all", positive)),
                               self._plain(self._combine("any", excluded)))
            # any: P1 or .. or (U - X1) or .. = U - ((X1 and ..) - (P1 or ..))
            either: Set | _AllBut = self._combine("any", positive) if not excluded else \
                _AllBut(self._combine("all", excluded) if not positive else except_(
                    self._plain(self._combine("all", excluded)),
                    self._plain(self._combine("any", positive))))
            if cond.kind == "any":
                return either
            return either.excluded if isinstance(either, _AllBut) else _AllBut(either)
        if isinstance(cond, EventCondition):
            return self.event_condition(cond)
        if isinstance(cond, TraitCondition):
            return self.trait_condition(cond.filter)
        if isinstance(cond, EventCondition):
            return self.event_condition(cond)
        if isinstance(cond, TraitCondition):
            return self.trait_condition(cond.filter)
        if isinstance(cond, Funnel):
            return self.funnel(cond.steps)
        if isinstance(cond, QueryAudience):
            query = text(cond.query)
            with contextlib.suppress(ArgumentError):  # a query need not use :now
                query = query.bindparams(
                    bindparam("now", bind_now(self.engine.dialect.name, self.now)))
            sub = query.columns(column("user_id")).subquery(cond.key)
            return select(sub.c.user_id).where(sub.c.user_id.is_not(None))
        raise SourceError(f"unresolved audience reference {cond!r}")

    def event_condition(self, cond: EventCondition) -> Set | _AllBut:
        table, clauses = self.event_rows(cond.event, cond.window, cond.filters)
        uid = table.c[self.cols.user_id]
        did = select(uid.label("user_id")).where(*clauses)
        if cond.count == "at_least":
            if cond.n == 1:
                return did.distinct()
            return did.group_by(uid).having(func.count() >= cond.n)
        if cond.count == "exactly" and cond.n > 0:
            return did.group_by(uid).having(func.count() == cond.n)
        # at_most N, exactly 0: everyone but who did it more often
        more = did.distinct() if cond.n == 0 else \
            did.group_by(uid).having(func.count() > cond.n)
        return _AllBut(more)

    def _trait_column(self, f: Filter) -> ColumnElement[Any]:
        users = self.users()
        name = segment_table(self.source, self.source.tables.users)
        if users is None:
            raise SourceError(f"trait {f.field!r}: the source has no table {name!r}")
        if f.field not in users.c:
            raise SourceError(f"trait {f.field!r}: table {name!r} has no column {f.field!r}")
        return users.c[f.field]

    def trait_condition(self, f: Filter) -> Set | _AllBut:
        trait = self._trait_column(f)
        users = self.users()
        assert users is not None
        ids = users.c[self.cols.users_id]
        if f.op == "not_exists":  # no users row at all is no value too
            have = select(ids.label("user_id")).where(ids.is_not(None), trait.is_not(None))
            return _AllBut(have)
        return select(ids.label("user_id")).where(ids.is_not(None), self.predicate(trait, f))

    def funnel(self, steps: tuple[FunnelStep, ...]) -> Set:
        """Step k's rows that come after some row of step k-1 (within its `within`); when
        step k has no `within`, only the earliest row of step k-1 matters."""
        first = steps[0]
        table, clauses = self.event_rows(first.event, Window(first.within), first.filters)
        previous: FromClause = select(
            table.c[self.cols.user_id].label("user_id"),
            self.instant(table.c[self.cols.timestamp]).label("t"),
        ).where(*clauses).distinct().subquery("step_1")
        for k, step in enumerate(steps[1:], start=2):
            if step.within is None:
                previous = select(previous.c.user_id, func.min(previous.c.t).label("t")) \
                    .group_by(previous.c.user_id).subquery(f"step_{k - 1}_first")
            table, clauses = self.event_rows(step.event, Window(), step.filters)
            uid = table.c[self.cols.user_id]
            t = self.instant(table.c[self.cols.timestamp])
            previous = select(uid.label("user_id"), t.label("t")).select_from(
                table.join(previous, previous.c.user_id == uid)
            ).where(*clauses, *self._within_after(t, previous.c.t, step.within)) \
                .distinct().subquery(f"step_{k}")
        return select(previous.c.user_id).distinct()

    # -- statements -------------------------------------------------------------------------

    def audience(self, where: Group) -> Select[Any]:
        users = self.users()
        if users is None:
            return select(self.condition(where).subquery("members").c.user_id)
        names = {"email": self.cols.email, "name": self.cols.name, "title": self.cols.title,
                 "company_id": "company_id"}
        contact = [users.c[names[c]].label(c) for c in CONTACT_TRAITS if names[c] in users.c]
        ids = users.c[self.cols.users_id]
        # Trait conditions of the top-level `all` filter the join that fetches the contact
        # traits anyway (as one writes it by hand), instead of a set of every matching user.
        parts = list(_all_parts(where))
        traits = [c.filter for c in parts
                  if isinstance(c, TraitCondition) and c.filter.op != "not_exists"]
        rest = [c for c in parts if not (isinstance(c, TraitCondition) and c.filter in traits)]
        tests = [self.predicate(self._trait_column(f), f) for f in traits]
        if not rest:
            return select(ids.label("user_id"), *contact).where(ids.is_not(None), *tests)
        members = self.condition(Group("all", tuple(rest))).subquery("members")
        joined = members.join(users, ids == members.c.user_id) if tests \
            else members.outerjoin(users, ids == members.c.user_id)
        return select(members.c.user_id, *contact).select_from(joined).where(*tests)

    def trait(self, compute: Compute) -> Select[Any]:
        table, clauses = self.event_rows(compute.event, compute.window, compute.filters,
                                         compute.property)
        uid = table.c[self.cols.user_id].label("user_id")
        kind = compute.kind
        if kind == "count":
            return select(uid, func.count().label("value")).where(*clauses).group_by(uid)
        assert compute.property is not None
        prop = table.c[compute.property]
        if kind in ("sum", "avg", "min", "max"):
            agg = getattr(func, kind)(prop)
            return select(uid, cast(agg, Double()).label("value")).where(*clauses) \
                .group_by(uid)
        if kind == "unique_count":
            return select(uid, func.count(prop.distinct()).label("value")).where(*clauses) \
                .group_by(uid)
        if kind == "unique_list":
            listed = func.json_group_array(prop.distinct()) if self.sqlite \
                else func.array_agg(prop.distinct())
            return select(uid, listed.label("value")).where(*clauses).group_by(uid)
        if kind == "most_frequent":
            counted = select(uid, prop.label("v"), func.count().label("n")).where(*clauses) \
                .group_by(uid, prop).having(func.count() >= 2).subquery("counted")
            order = (counted.c.n.desc(), counted.c.v.asc())
            ranked = select(counted.c.user_id, counted.c.v, func.row_number().over(
                partition_by=counted.c.user_id, order_by=order).label("nth")) \
                .subquery("ranked")
        else:  # first, last: by time, ties to the smaller value
            t = self.instant(table.c[self.cols.timestamp])
            by_time = t.asc() if kind == "first" else t.desc()
            ranked = select(uid, prop.label("v"), func.row_number().over(
                partition_by=table.c[self.cols.user_id], order_by=(by_time, prop.asc()))
                .label("nth")).where(*clauses).subquery("ranked")
        return select(ranked.c.user_id, ranked.c.v.label("value")).where(ranked.c.nth == 1)
