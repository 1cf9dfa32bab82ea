"""`compile` and `preview`: what a definition runs on its source, and who it selects.

Neither opens the state database: they read the config and the source only, so they work
before a first `sync` and never change a thing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

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

if TYPE_CHECKING:
    from audience_sync.config import Computation


def _definition_kind(comp: Computation) -> str:
    if comp.query is not None:
        return "query"
    if comp.rule is not None:
        return "rule"
    return "where" if comp.kind == "audience" else "compute"


@app.command("compile")
def compile_command(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Audience or computed trait, by key or name."),
    at: str | None = typer.Option(None, "--at", help="The clock to bind (ISO-8601); now "
                                  "by default."),
) -> None:
    """Print the SQL a definition runs on its source, for the source's dialect."""
    from audience_sync.sources import compiled_sql

    config = open_config(ctx)
    comp = resolve(config, [name])[0]
    now = parse_time(at, "--at") or utcnow()
    compiled = compiled_sql(comp, now)
    print(f"-- {comp.kind} {comp.key} ({_definition_kind(comp)}:) on source "
          f"{comp.source_name!r} ({compiled.dialect}), clock "
          f"{now.astimezone(UTC).isoformat()}")
    for key, value in compiled.unbound.items():
        print(f"-- :{key} = {value!r}")
    print(compiled.sql.strip() + ";")


@app.command()
def preview(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Audience or computed trait, by key or name."),
    limit: int = typer.Option(20, "--limit", min=0, help="How many users to show."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run a definition on its source and show how many users it selects and a sample;
    writes nothing anywhere."""
    from audience_sync.sources import preview as run_preview

    config = open_config(ctx)
    comp = resolve(config, [name])[0]
    now = utcnow()
    result = run_preview(comp, now, limit)
    skipped, sample, count = result.skipped, result.sample, result.count
    columns = result.columns
    account = comp.level == "account"
    if account:
        # As the definition names them: the account's group_id, the group call's user_id.
        renamed = {"user_id": "group_id", "user_ref": "user_id"}
        columns = tuple(renamed.get(c, c) for c in columns)
    users = [_shape(columns, row) for row in sample]
    if as_json:
        print_json({"key": comp.key, "kind": comp.kind, "level": comp.level,
                    "source": comp.source_name, "clock": now.isoformat(), "count": count,
                    "sample": users, "skipped": skipped.as_dict()})
        return
    noun = ("accounts" if account else "members") if comp.kind == "audience" else (
        "accounts with a value" if account else "users with a value")
    print(f"{comp.key}: {count} {noun} (source {comp.source_name!r}, clock "
          f"{_clock(now)})")
    if skipped.total:
        print("skipped rows: " + ", ".join(f"{n} {reason.replace('_', ' ')}"
                                           for reason, n in skipped.as_dict().items() if n))
    if not users:
        return
    from rich.table import Table

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
