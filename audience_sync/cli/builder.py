"""`compile` and `preview`: what a definition runs on its source, and who it selects.

Neither opens the state database: they read the config and the source only, so they work
before a first `sync` and never change a thing.
"""

from __future__ import annotations

import contextlib
import heapq
import json
from datetime import UTC, datetime
from typing import Any

import typer
from rich.table import Table
from sqlalchemy import Engine, Select
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.sql.elements import TextClause

from audience_sync.cli.common import (
    JSON_OPTION,
    app,
    console,
    open_config,
    parse_time,
    print_json,
    resolve,
)
from audience_sync.clock import utcnow
from audience_sync.config import Computation
from audience_sync.errors import SourceError
from audience_sync.sources import (
    SkipCounts,
    Snapshot,
    computation_statement,
    create_source_engine,
    describe_db_error,
)


def _definition_kind(comp: Computation) -> str:
    if comp.query is not None:
        return "query"
    if comp.rule is not None:
        return "rule"
    return "where" if comp.kind == "audience" else "compute"


def render_sql(statement: Select[Any] | TextClause, params: dict[str, Any], engine: Engine) \
        -> tuple[str, dict[str, Any]]:
    """The SQL with its values written in where the dialect can render them as literals;
    otherwise with placeholders, and the values to list beside it."""
    if isinstance(statement, TextClause):
        for key, value in params.items():
            with contextlib.suppress(ArgumentError):  # a query need not use :now
                statement = statement.bindparams(**{key: value})
    try:
        literal = statement.compile(dialect=engine.dialect,
                                    compile_kwargs={"literal_binds": True})
        return str(literal), {}
    except (SQLAlchemyError, NotImplementedError, TypeError, ValueError):
        compiled = statement.compile(dialect=engine.dialect)
        return str(compiled), dict(compiled.params)


def _source_engine(comp: Computation) -> Engine:
    return create_source_engine(comp.source.url)


@app.command("compile")
def compile_command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Audience or computed trait, by key or name."),
    at: str | None = typer.Option(None, "--at", help="The clock to bind (ISO-8601); now "
                                  "by default."),
) -> None:
    """Print the SQL a definition runs on its source, for the source's dialect."""
    config = open_config(ctx)
    comp = resolve(config, [name])[0]
    now = parse_time(at, "--at") or utcnow()
    engine = _source_engine(comp)
    try:
        statement, params = computation_statement(comp, engine, now)
        sql, unbound = render_sql(statement, params, engine)
    except SQLAlchemyError as exc:
        raise SourceError(f"{comp.path} ({comp.key}): {describe_db_error(exc)}") from exc
    finally:
        engine.dispose()
    print(f"-- {comp.kind} {comp.key} ({_definition_kind(comp)}:) on source "
          f"{comp.source_name!r} ({engine.dialect.name}), clock "
          f"{now.astimezone(UTC).isoformat()}")
    for key, value in unbound.items():
        print(f"-- :{key} = {value!r}")
    print(sql.strip() + ";")


@app.command()
def preview(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Audience or computed trait, by key or name."),
    limit: int = typer.Option(20, "--limit", min=0, help="How many users to show."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a definition on its source and show how many users it selects and a sample;
    writes nothing anywhere."""
    config = open_config(ctx)
    comp = resolve(config, [name])[0]
    now = utcnow()
    engine = _source_engine(comp)
    skipped = SkipCounts()
    snapshot = Snapshot(comp, engine, now, skipped)
    seen: set[str] = set()
    sample: list[tuple[Any, ...]] = []
    try:
        for chunk in snapshot:
            fresh = [row for row in chunk if row[0] not in seen]
            skipped.duplicate += len(chunk) - len(fresh)
            seen.update(row[0] for row in fresh)
            # The smallest ids: the same sample every time for the same result.
            sample = heapq.nsmallest(limit, [*sample, *fresh], key=lambda row: row[0])
    finally:
        engine.dispose()
    columns = snapshot.columns
    users = [_shape(columns, row) for row in sample]
    if as_json:
        print_json({"key": comp.key, "kind": comp.kind, "source": comp.source_name,
                    "clock": now.isoformat(), "count": len(seen), "sample": users,
                    "skipped": {"null": skipped.null, "empty": skipped.empty,
                                "too_long": skipped.too_long,
                                "duplicate": skipped.duplicate}})
        return
    noun = "members" if comp.kind == "audience" else "users with a value"
    print(f"{comp.key}: {len(seen)} {noun} (source {comp.source_name!r}, clock "
          f"{_clock(now)})")
    if skipped.total:
        print(f"skipped rows: {skipped.null} null, {skipped.empty} empty, "
              f"{skipped.too_long} too long, {skipped.duplicate} duplicate user ids")
    if not users:
        return
    table = Table(show_edge=False)
    for column in columns:
        table.add_column(column)
    for user in users:
        table.add_row(*("" if user[c] is None else
                        json.dumps(user[c]) if c == "value" else str(user[c])
                        for c in columns))
    console().print(table)


def _shape(columns: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    user = dict(zip(columns, row, strict=True))
    if "value" in user:
        user["value"] = json.loads(user["value"])
    return user


def _clock(now: datetime) -> str:
    return now.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
