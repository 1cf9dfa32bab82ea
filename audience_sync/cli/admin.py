"""`check`, `db upgrade` and `status`."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer

from audience_sync.cli.common import (
    SCHEMA_VERSION,
    app,
    console,
    iso,
    open_config,
    open_store,
    print_json,
)
from audience_sync.errors import AudienceSyncError
from audience_sync.states import DeliveryStatus, InitialState
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
def check(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Validate the config, reach every source and destination, and prepare every audience's
    and trait's query against its source (LIMIT 0): print what is wrong."""
    from audience_sync.clock import utcnow
    from audience_sync.destinations import check_destination
    from audience_sync.sources import (
        ping_source,
        prove_account_users,
        prove_definitions,
        read_only_note,
    )
    from audience_sync.state.store import open_without_writing

    config = open_config(ctx)
    out = console()
    items: list[dict[str, Any]] = []

    def found(kind: str, name: str, problem: str | None, shown: str | None = None,
              **more: Any) -> None:
        # A base_url or database URL may carry a password or a key in its query; whatever
        # a driver or a destination put in its message, no URL is printed unmasked.
        items.append({"kind": kind, "name": name, "ok": problem is None,
                      "problem": mask_urls_in(problem) if problem else None, **more})
        if not as_json:
            columns = more.get("columns")
            text = shown or "ok" + (f" (columns: {', '.join(columns)})" if columns else "") \
                if problem is None else f"FAILED: {problem}"
            out.print(mask_urls_in(f"{name}: {text}"), markup=False)

    found("config", f"config {config.path}", None)
    try:
        # check writes nothing: a missing or old schema is reported, not created or migrated.
        open_without_writing(config.state_db).dispose()
        found("state_db", "state_db", None)
    except AudienceSyncError as exc:
        found("state_db", "state_db", str(exc))
    for name, source in config.sources.items():
        unreachable = ping_source(source)
        found("source", f"sources.{name}", unreachable, note=read_only_note(source.url))
        note = read_only_note(source.url)
        if note is not None and not as_json:
            out.print(mask_urls_in(f"sources.{name}: note: {note}"), markup=False)
        if source.account_users is not None and unreachable is None:
            columns, problem = prove_account_users(source, utcnow())
            found("source", f"sources.{name}.account_users", problem,
                  columns=list(columns) if problem is None else None)
    for proof in prove_definitions(config.computations, utcnow()):
        comp = proof.comp
        found(comp.kind, f"{comp.path} ({comp.key})", proof.problem, key=comp.key,
              columns=list(proof.columns) if proof.ok else None)
    for name, dest in config.destinations.items():
        ok, message = check_destination(name, dest, [
            (c.key, c.kind, c.level) for c in config.computations if name in c.destinations])
        found("destination", f"destinations.{name}", None if ok else message,
              shown=message if ok else None, note=message if ok else None)
    problems = sum(not item["ok"] for item in items)
    if as_json:
        for item in items:
            item.setdefault("key", None)
            item.setdefault("columns", None)
            item.setdefault("note", None)
        print_json({"schema_version": SCHEMA_VERSION, "ok": not problems,
                    "problems": problems, "checks": items})
    elif problems:
        out.print(f"{problems} problem(s) found", markup=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def status(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Per audience and trait: members, last run, next due, deliveries pending and failed, and
    an initial sync's progress (sent/total, rate, ETA)."""
    from audience_sync.clock import utcnow
    from audience_sync.state import queries

    config = open_config(ctx)
    store = open_store(config)
    now = utcnow()
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
        progress = queries.initial_progress(store, row.id, now) \
            if row.initial_state == InitialState.DELIVERING else None
        items.append({
            "key": key,
            "name": row.name,
            "kind": row.kind,
            "level": row.level,
            "orphaned": key not in configured and key not in disabled,
            "enabled": key not in disabled,
            "destinations": list(comp.destinations) if comp else [],
            "members": row.member_count,
            "initial_sync": row.initial_state,
            "initial_progress": progress.as_dict() if progress else None,
            "last_run": last_run.summary() if last_run else None,
            "last_success_at": iso(row.last_success_at),
            "next_due_at": iso(row.next_due_at) if key in configured else None,
            "pending": pending,
            "failed": failed,
            "lease_owner": row.lease_owner,
            "_next": row.next_due_at if key in configured else None,
            "_last": last_run.clock if last_run else None,
            "_progress": progress,
        })
    if as_json:
        print_json({"schema_version": SCHEMA_VERSION, "state_db": store.dialect,
                    "computations": [{k: v for k, v in item.items() if not k.startswith("_")}
                                     for item in items]})
        return
    _print_status(items, now)


def _print_status(items: list[dict[str, Any]], now: datetime) -> None:
    """A block per audience or trait, readable at 80 columns (times: UTC to the second, and
    how far from now), with an initial sync's progress while it delivers."""
    from audience_sync.clock import duration, table_time

    if not items:
        print("(no audiences or traits yet)", file=sys.stderr)
    for item in items:
        run = item["last_run"]
        print(f"{item['key']}" + (" (orphaned)" if item["orphaned"] else "")
              + ("" if item["enabled"] else " (disabled)")
              + f"  {item['kind']}, {item['members']:,} "
              + ("accounts" if item["level"] == "account" else "members") + ", "
              f"initial sync {item['initial_sync']}")
        print("  last run   " + ("-" if run is None else
              f"{run['kind']} {run['status']} +{run['entered']} -{run['exited']} "
              f"~{run['changed']}, {table_time(item['_last'], now)}"))
        print(f"  next due   {table_time(item['_next'], now)}")
        print(f"  pending    {_per_destination(item['pending'])}")
        if item["failed"]:
            print(f"  failed     {_per_destination(item['failed'])}")
        progress: queries.Progress | None = item["_progress"]
        if progress is not None:
            percent = 100 * progress.done / progress.total if progress.total else 100.0
            rate = f"{progress.rate:,.1f}/s" if progress.rate else "rate not known yet"
            eta = f"ETA {duration(progress.eta_seconds)}" if progress.eta_seconds \
                else "ETA unknown"
            print(f"  delivering since {table_time(progress.started_at, now)}")
            print(f"             {progress.done:,}/{progress.total:,} delivered "
                  f"({percent:.0f}%), {rate}, {eta}")


def _per_destination(counts: dict[str, int]) -> str:
    return ", ".join(f"{dest}: {n:,}" for dest, n in sorted(counts.items())) or "0"
