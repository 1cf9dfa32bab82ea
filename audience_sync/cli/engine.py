"""`sync`, `resync`, `members`, `history` and `runs`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import typer

from audience_sync.cli.common import (
    JSON_OPTION,
    app,
    console,
    iso,
    open_config,
    open_store,
    parse_time,
    print_drain_report,
    print_json,
    resolve,
)
from audience_sync.clock import utcnow
from audience_sync.errors import StoreError, UsageError

if TYPE_CHECKING:
    from audience_sync.alerts import AlertSender
    from audience_sync.config import Computation, Config
    from audience_sync.drain import DrainReport
    from audience_sync.leases import Holder, Lease
    from audience_sync.runner import RunResult
    from audience_sync.state.store import Store

NO_WAIT_OPTION = typer.Option(False, "--no-wait", help="Exit 1 when another process (a daemon) "
                              "holds an audience's lease, instead of waiting for it.")


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int], None] | None]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        yield None
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"),
                  TextColumn("{task.completed:,} rows"), TimeElapsedColumn(),
                  transient=True, console=console().__class__(stderr=True)) as bar:
        task = bar.add_task(label, total=None)
        yield lambda n: bar.advance(task, n)


def take_leases(stack: ExitStack, store: Store, comps: list[Computation],
                no_wait: bool) -> list[Lease]:
    """The same per-audience leases the daemon takes, held (renewed) until `stack` closes:
    through run and drain for sync and resync, through the drain for retry."""
    from audience_sync.leases import default_owner, hold_all

    def tell(key: str, current: Holder) -> None:
        print(f"{key}: waiting for the lease held by {current.owner} "
              "(--no-wait to give up instead)", file=sys.stderr, flush=True)

    return hold_all(stack, store, [c.key for c in comps], f"cli:{default_owner()}",
                    clock=utcnow, wait=not no_wait, on_wait=tell)


def report_drain(report: DrainReport, as_json: bool) -> None:
    """The per-destination counts, then one line on stderr per destination that left
    deliveries waiting (the command then exits 1: cron must not see success)."""
    if not as_json:
        print_drain_report(report)
    for line in report.waiting_lines():
        print(line, file=sys.stderr)


def _execute(ctx: typer.Context, names: list[str], *, resync: bool, dry_run: bool, force: bool,
             as_json: bool, no_wait: bool = False) -> None:
    config = open_config(ctx)
    comps = resolve(config, names)
    # A dry run writes nothing: not even the schema or the audiences' registration.
    store = _open_for_dry_run(config) if dry_run else open_store(config)
    with ExitStack() as stack:
        # Before the leases: the exit stack waits for alerts after releasing them.
        sender = None if dry_run else _alert_sender(stack, config)
        leases = [] if dry_run else take_leases(stack, store, comps, no_wait)
        results, report = _run_and_drain(store, config, comps, leases, resync=resync,
                                         dry_run=dry_run, force=force, as_json=as_json,
                                         sender=sender)
    ok = all(r.ok for r in results) and (report is None or report.ok)
    if as_json:
        print_json({"ok": ok, "dry_run": dry_run, "runs": [r.as_dict() for r in results],
                    "deliveries": report.as_dict() if report else None})
    if not ok:
        raise typer.Exit(1)


def _alert_sender(stack: ExitStack, config: Config) -> AlertSender | None:
    """The alerts' sender, given a bounded time to send at exit (after the leases go)."""
    if not config.alerts:
        return None
    from audience_sync.alerts import AlertSender

    sender = AlertSender()
    stack.callback(sender.close)
    return sender


def _open_for_dry_run(config: Config) -> Store:
    from audience_sync.state.store import open_without_writing

    try:
        return open_without_writing(config.state_db)
    except StoreError as exc:
        raise UsageError(f"--dry-run writes nothing: {exc.message}") from None


def _run_and_drain(store: Store, config: Config, comps: list[Computation],
                   leases: list[Lease], *, resync: bool, dry_run: bool, force: bool,
                   as_json: bool, sender: AlertSender | None = None,
                   ) -> tuple[list[RunResult], DrainReport | None]:
    from audience_sync.alerts import notify_drain, notify_run
    from audience_sync.drain import drain
    from audience_sync.runner import run_computation

    tokens = {lease.key: lease.token for lease in leases}
    results: list[RunResult] = []
    for comp in comps:
        with _progress(f"{comp.key}: loading snapshot") as progress:
            result = run_computation(store, config, comp, resync=resync, force=force,
                                     dry_run=dry_run, progress=progress,
                                     fencing_token=tokens.get(comp.key))
        results.append(result)
        if not dry_run:
            notify_run(store, config, result, sender, utcnow())
        if not as_json:
            _print_result(result, dry_run, _run_record(store, result))
    report: DrainReport | None = None
    if not dry_run:
        report = drain(store, config, leases)
        notify_drain(store, config, report, [c.key for c in comps], sender, utcnow())
        report_drain(report, as_json)
    return results, report


def _run_record(store: Store, result: RunResult) -> dict[str, Any] | None:
    from audience_sync.state import queries

    if result.run_id is None:
        return None
    record = queries.run_record(store, result.run_id)
    return record.as_dict() if record is not None else None


def _print_result(result: RunResult, dry_run: bool, record: dict[str, Any] | None) -> None:
    """The figures of the run record when the run left one (a held run queued nothing)."""
    skipped = result.skipped
    figures = record if record is not None else result.as_dict()
    parts = [f"{result.key}: {result.kind} {'plan' if dry_run and result.ok else result.status}",
             f"{figures['members']} members (+{figures['entered']} -{figures['exited']} "
             f"~{figures['changed']})",
             f"{figures['queued']} queued" if not dry_run
             else f"{figures['queued']} would be sent"]
    if skipped.total:
        reasons = ", ".join(f"{reason.replace('_', ' ')} {n}"
                            for reason, n in skipped.as_dict().items())
        parts.append(f"skipped {skipped.total} rows ({reasons})")
    print(", ".join(parts))
    if result.error:
        print(f"  {result.error}", file=sys.stderr)
    if dry_run:
        if result.sample_entered:
            print(f"  would enter: {', '.join(result.sample_entered)}")
        if result.sample_exited:
            print(f"  would exit: {', '.join(result.sample_exited)}")


@app.command()
def sync(
    ctx: typer.Context,
    audiences: list[str] = typer.Argument(None, help="Names or keys; all when omitted."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    force: bool = typer.Option(False, "--force", help="Apply a run the removal guard held."),
    no_wait: bool = NO_WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Evaluate audiences now, whatever their cadence, and deliver the changes."""
    _execute(ctx, audiences or [], resync=False, dry_run=dry_run, force=force, as_json=as_json,
             no_wait=no_wait)


@app.command()
def resync(
    ctx: typer.Context,
    audience: str = typer.Argument(..., help="Name or key."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    force: bool = typer.Option(False, "--force", help="Apply a run the removal guard held."),
    no_wait: bool = NO_WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Send every current member again, and false to those who left since the last run."""
    _execute(ctx, [audience], resync=True, dry_run=dry_run, force=force, as_json=as_json,
             no_wait=no_wait)


def _computation_id(store: Store, comp: Computation) -> int:
    row = store.computation(comp.key)
    if row is None:  # pragma: no cover - open_store registers every configured computation
        raise UsageError(f"{comp.key} is not in the state database")
    return row.id


@app.command()
def members(
    ctx: typer.Context,
    audience: str = typer.Argument(..., help="Name or key."),
    at: str = typer.Option(None, "--at", help="ISO-8601 time; members now when omitted."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Members now, or at a past time (from the history)."""
    from audience_sync.state import queries

    when = parse_time(at, "--at")
    config = open_config(ctx)
    comp = resolve(config, [audience])[0]
    store = open_store(config)
    cid = _computation_id(store, comp)
    if comp.kind == "audience":
        _stream(queries.audience_members(store, cid, when), as_json,
                lambda r: {k: v for k, v in r._asdict().items() if v is not None})
    else:
        _stream(queries.trait_values(store, cid, when), as_json,
                lambda r: {"user_id": r.user_id,
                           "value": json.loads(r.value) if r.value is not None else None})


def _stream(rows: Any, as_json: bool, shape: Callable[[Any], dict[str, Any]]) -> None:
    """Write rows as they come: a million members never sit in memory."""
    out = sys.stdout
    count = 0
    if as_json:
        out.write("[")
    for row in rows:
        item = shape(row)
        if as_json:
            out.write(("," if count else "") + "\n  " + json.dumps(item, default=str))
        else:
            out.write("\t".join("" if v is None else str(v) for v in item.values()) + "\n")
        count += 1
    if as_json:
        out.write("\n]\n" if count else "]\n")
    elif count == 0:
        print("(none)", file=sys.stderr)


@app.command()
def history(
    ctx: typer.Context,
    audience: str = typer.Argument(..., help="Name or key."),
    user: str = typer.Option(None, "--user", help="Only this user id."),
    since: str = typer.Option(None, "--since", help="Only changes at or after this time."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Membership changes (entered / exited), oldest first."""
    from audience_sync.state import queries

    when = parse_time(since, "--since")
    config = open_config(ctx)
    comp = resolve(config, [audience])[0]
    store = open_store(config)
    cid = _computation_id(store, comp)

    def shape(event: queries.HistoryEvent) -> dict[str, Any]:
        item: dict[str, Any] = {"user_id": event.user_id, "change": event.change,
                                "at": iso(event.at), "run_id": event.run_id}
        if comp.kind == "trait" and event.change == "set":
            item["value"] = json.loads(event.value) if event.value is not None else None
        return item

    _stream(queries.history(store, cid, comp.kind, user=user, since=when), as_json, shape)


@app.command()
def runs(
    ctx: typer.Context,
    audience: str = typer.Argument(None, help="Name or key; every audience when omitted."),
    limit: int = typer.Option(50, "--limit", min=1, help="Most recent N runs."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run history with counts and outcome, newest first."""
    from audience_sync.state import queries

    config = open_config(ctx)
    store = open_store(config)
    key = resolve(config, [audience])[0].key if audience else None
    items = [record.as_dict() for record in queries.runs(store, key=key, limit=limit)]
    if as_json:
        print_json(items)
        return
    for item in items:
        print(f"#{item['run_id']} {item['clock']} {item['key']} {item['kind']} {item['status']}: "
              f"{item['members']} members +{item['entered']} -{item['exited']} "
              f"~{item['changed']}, {item['queued']} queued"
              + (f" ({item['error']})" if item["error"] else ""))
    if not items:
        print("(no runs yet)", file=sys.stderr)
