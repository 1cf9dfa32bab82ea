"""`check`, `db upgrade` and `status`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from audience_sync.cli.common import app, console, iso, open_config, open_store, print_json
from audience_sync.errors import AudienceSyncError
from audience_sync.states import DeliveryStatus
from audience_sync.urls import mask_urls_in

if TYPE_CHECKING:
    from audience_sync.state import queries

db_app = typer.Typer(help="State database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply the state database migrations (every command also does this on start)."""
    from audience_sync.state.store import Store

    config = open_config(ctx)
    store = Store(config.state_db)
    applied = store.upgrade()
    revision = store.current_revision()
    print(f"state database at revision {revision}" + (" (upgraded)" if applied else
                                                       " (already up to date)"))


@app.command()
def check(ctx: typer.Context) -> None:
    """Validate the config and reach every source and destination; print what is wrong."""
    from audience_sync.destinations import check_destination
    from audience_sync.sources import check_definitions, ping_source, read_only_note
    from audience_sync.state.store import open_without_writing

    config = open_config(ctx)
    out = console()

    def say(line: str) -> None:
        # A base_url or database URL may carry a password or a key in its query; whatever
        # a driver or a destination put in its message, no URL is printed unmasked.
        out.print(mask_urls_in(line), markup=False)

    problems = 0
    say(f"config {config.path}: ok ({len(config.computations)} audiences and traits)")
    try:
        # check writes nothing: a missing or old schema is reported, not created or migrated.
        open_without_writing(config.state_db).dispose()
        say("state_db: ok")
    except AudienceSyncError as exc:
        problems += 1
        say(f"state_db: FAILED: {exc}")
    for name, source in config.sources.items():
        error = ping_source(source)
        problems += error is not None
        say(f"sources.{name}: " + ("ok" if error is None else f"FAILED: {error}"))
        note = read_only_note(source.url)
        if note is not None:
            say(f"sources.{name}: note: {note}")
    for comp, problem in check_definitions(config.computations):
        problems += 1
        say(f"{comp.path} ({comp.key}): FAILED: {problem}")
    for name, dest in config.destinations.items():
        ok, message = check_destination(name, dest)
        problems += not ok
        say(f"destinations.{name}: " + (message if ok else f"FAILED: {message}"))
    if problems:
        say(f"{problems} problem(s) found")
        raise typer.Exit(1)


@app.command()
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Per audience and trait: key, members, last run, next due, deliveries pending and failed."""
    from rich.table import Table

    from audience_sync.state import queries

    config = open_config(ctx)
    store = open_store(config)
    rows = {row.key: row for row in queries.computations(store)}
    counts = queries.delivery_counts(store)
    items: list[dict[str, Any]] = []
    configured = {comp.key for comp in config.computations}
    disabled = {comp.key for comp in config.disabled}
    for key, row in rows.items():
        comp = next((c for c in (*config.computations, *config.disabled) if c.key == key),
                    None)
        last_run = queries.run_record(store, row.last_run_id) if row.last_run_id else None
        pending = {dest: n for (cid, dest, st), n in counts.items()
                   if cid == row.id and st == DeliveryStatus.PENDING}
        failed = {dest: n for (cid, dest, st), n in counts.items()
                  if cid == row.id and st == DeliveryStatus.FAILED}
        items.append({
            "key": key,
            "name": row.name,
            "kind": row.kind,
            "orphaned": key not in configured and key not in disabled,
            "enabled": key not in disabled,
            "destinations": list(comp.destinations) if comp else [],
            "members": row.member_count,
            "initial_sync": row.initial_state,
            "last_run": _run_summary(last_run),
            "last_success_at": iso(row.last_success_at),
            "next_due_at": iso(row.next_due_at) if key in configured else None,
            "pending": pending,
            "failed": failed,
            "lease_owner": row.lease_owner,
        })
    if as_json:
        print_json({"state_db": store.dialect, "computations": items})
        return
    table = Table(title=None, show_edge=False)
    for column in ("key", "kind", "members", "initial", "last run", "next due", "pending",
                   "failed"):
        table.add_column(column)
    for item in items:
        run = item["last_run"]
        run_text = "-" if run is None else (
            f"{run['kind']} {run['status']} +{run['entered']} -{run['exited']} ~{run['changed']}")
        table.add_row(
            item["key"] + (" (orphaned)" if item["orphaned"] else "")
            + ("" if item["enabled"] else " (disabled)"),
            item["kind"], str(item["members"]), item["initial_sync"], run_text,
            item["next_due_at"] or "-",
            _per_destination(item["pending"]), _per_destination(item["failed"]))
    console().print(table)


def _run_summary(run: queries.RunRecord | None) -> dict[str, Any] | None:
    """The run record's one mapping, as status has always named it: `id`, no key, no forced."""
    if run is None:
        return None
    return {("id" if name == "run_id" else name): value for name, value in run.as_dict().items()
            if name not in ("key", "forced")}


def _per_destination(counts: dict[str, int]) -> str:
    return ", ".join(f"{dest}: {n}" for dest, n in sorted(counts.items())) or "0"
