"""`prune` and `forget`: the outbox and orphaned audiences, kept from growing forever."""

from __future__ import annotations

import sys

import typer

from audience_sync.cli.common import JSON_OPTION, app, iso, open_config, open_store, print_json
from audience_sync.clock import utcnow
from audience_sync.errors import UsageError


@app.command()
def prune(
    ctx: typer.Context,
    older_than: str = typer.Option(None, "--older-than", show_default=False,
                                   help="Age such as 30d (default: `retention` in the config, "
                                   "30d)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete sent and superseded deliveries older than that (never pending or failed ones,
    never history)."""
    from audience_sync.config import parse_duration
    from audience_sync.state.housekeeping import prune_deliveries

    config = open_config(ctx)
    age = config.retention
    if older_than is not None:
        try:
            age = parse_duration(older_than)
        except ValueError as exc:
            raise UsageError(f"--older-than: {exc}") from None
    store = open_store(config)
    before = utcnow() - age
    removed = prune_deliveries(store, before)
    if as_json:
        print_json({"schema_version": 1, "pruned": removed, "before": iso(before)})
    else:
        print(f"pruned {removed} sent or superseded deliveries older than {iso(before)}")


@app.command()
def forget(
    ctx: typer.Context,
    audience: str = typer.Argument(..., help="Key (or stored name) of an orphaned audience."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    purge: bool = typer.Option(False, "--purge", help="Also delete its history and runs."),
) -> None:
    """Drop an orphaned audience's current state (members, deliveries, lease); its history
    stays unless --purge."""
    from audience_sync.state import queries
    from audience_sync.state.housekeeping import forget as forget_state

    config = open_config(ctx)
    wanted = audience.strip()
    for comp in (*config.computations, *config.disabled):
        if wanted in (comp.key, comp.name):
            raise UsageError(f"{comp.key} is configured ({comp.path}); only an orphaned "
                             "audience can be forgotten: remove it from the config first")
    store = open_store(config)
    row = store.computation(wanted) or next(
        (r for r in queries.computations(store) if r.name == wanted), None)
    if row is None or (row.forgotten_at is not None and not purge):
        raise UsageError(f"no orphaned audience {audience!r} in the state database")
    what = "its current state, history and runs" if purge else \
        "its current state (its history stays)"
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"forget {row.key}: pass --yes to confirm (no terminal to ask on)")
        if not typer.confirm(f"Forget {row.key}: delete {what}?", default=False):
            print("nothing forgotten", file=sys.stderr)
            raise typer.Exit(1)
    result = forget_state(store, row.id, utcnow(), purge=purge)
    print(f"forgot {row.key}: {result.members} members and {result.deliveries} deliveries "
          "deleted" + (f", {result.history} history rows and runs deleted" if purge
                       else "; history kept"))
