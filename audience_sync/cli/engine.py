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
    SCHEMA_VERSION,
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
    from audience_sync.progress import DeliveryProgress
    from audience_sync.runner import RunResult
    from audience_sync.state.store import Store

NO_WAIT_OPTION = typer.Option(False, "--no-wait", help="Exit 1 when another process (a daemon) "
                              "holds an audience's lease, instead of waiting for it.")
WAIT_OPTION = typer.Option("60s", "--wait", metavar="DURATION",
                           help="Wait at most this long (30s, 5m) for another process's lease, "
                           "then exit 1 naming the holder.")


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int], None] | None]:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        from audience_sync.progress import LogLines, Meter

        # No total is known while a query streams: rows so far and their rate.
        # The runner says when the load ends, with its rate: no closing line here.
        yield LogLines(Meter(label, None, unit="rows")).advance
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"),
                  TextColumn("{task.completed:,} rows"), TimeElapsedColumn(),
                  transient=True, console=console().__class__(stderr=True)) as bar:
        task = bar.add_task(label, total=None)
        yield lambda n: bar.advance(task, n)


def parse_wait(value: str) -> float:
    from audience_sync.config import parse_duration

    try:
        return parse_duration(value).total_seconds()
    except ValueError as exc:
        raise UsageError(f"--wait: {exc}") from None


def take_leases(stack: ExitStack, store: Store, comps: list[Computation],
                no_wait: bool, max_wait: float | None = None) -> list[Lease]:
    """The same per-audience leases the daemon takes, held (renewed) until `stack` closes:
    through run and drain for sync and resync, through the drain for retry."""
    from audience_sync.leases import default_owner, hold_all

    def tell(key: str, current: Holder) -> None:
        limit = f" for at most {max_wait:g}s" if max_wait is not None else ""
        print(f"{key}: waiting{limit} for the lease held by {current.owner} "
              "(--no-wait to give up instead)", file=sys.stderr, flush=True)

    return hold_all(stack, store, [c.key for c in comps], f"cli:{default_owner()}",
                    clock=utcnow, wait=not no_wait, on_wait=tell, max_wait=max_wait)


def report_drain(report: DrainReport, as_json: bool) -> None:
    """The per-destination counts, then one line on stderr per destination that left
    deliveries waiting (the command then exits 1: cron must not see success)."""
    if not as_json:
        print_drain_report(report)
    for line in report.waiting_lines():
        print(line, file=sys.stderr)


# Exit codes of sync and resync (documented in the README): 1 wins over 3.
EXIT_OK, EXIT_FAILED, EXIT_HELD = 0, 1, 3


def exit_code(results: list[RunResult], report: DrainReport | None) -> int:
    """1 when a run or a delivery failed (or tried deliveries still wait), else 3 when the
    guard held a run, else 0."""
    from audience_sync.states import RunStatus

    if any(r.status == RunStatus.FAILED for r in results) or (report is not None
                                                               and not report.ok):
        return EXIT_FAILED
    if any(r.status == RunStatus.HELD for r in results):
        return EXIT_HELD
    return EXIT_OK


def _execute(ctx: typer.Context, names: list[str], *, resync: bool, dry_run: bool, force: bool,
             as_json: bool, no_wait: bool = False, wait: str = "60s") -> None:
    max_wait = parse_wait(wait)
    config = open_config(ctx)
    comps = resolve(config, names)
    # A dry run writes nothing: not even the schema or the audiences' registration.
    store = _open_for_dry_run(config) if dry_run else open_store(config)
    with ExitStack() as stack:
        # Before the leases: the exit stack waits for alerts after releasing them.
        sender = None if dry_run else _alert_sender(stack, config)
        leases = [] if dry_run else take_leases(stack, store, comps, no_wait, max_wait)
        runs, results, report = _run_and_drain(store, config, comps, leases, resync=resync,
                                               dry_run=dry_run, force=force, as_json=as_json,
                                               sender=sender)
    code = exit_code(results, report)
    if as_json:
        print_json({"schema_version": SCHEMA_VERSION, "ok": code == EXIT_OK,
                    "exit_code": code, "dry_run": dry_run, "runs": runs,
                    "deliveries": report.as_dict() if report else None})
    if code:
        raise typer.Exit(code)


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
                   ) -> tuple[list[dict[str, Any]], list[RunResult], DrainReport | None]:
    from audience_sync.alerts import notify_drain, notify_run
    from audience_sync.drain import drain
    from audience_sync.runner import run_computation

    tokens = {lease.key: lease.token for lease in leases}
    results: list[RunResult] = []
    runs: list[dict[str, Any]] = []
    for comp in comps:
        with _progress(f"{comp.key}: loading snapshot") as progress:
            result = run_computation(store, config, comp, resync=resync, force=force,
                                     dry_run=dry_run, progress=progress,
                                     fencing_token=tokens.get(comp.key))
        results.append(result)
        runs.append(run_document(store, result))
        if not dry_run:
            notify_run(store, config, result, sender, utcnow())
        if not as_json:
            _print_result(runs[-1], dry_run)
    report: DrainReport | None = None
    if not dry_run:
        with delivery_progress() as progress:
            report = drain(store, config, leases, progress=progress.tracker)
        notify_drain(store, config, report, [c.key for c in comps], sender, utcnow())
        report_drain(report, as_json)
    return runs, results, report


def delivery_progress() -> DeliveryProgress:
    """Per destination: a rich bar on a terminal, else plain log lines every ~10 s or 10%."""
    from audience_sync.progress import DeliveryProgress

    return DeliveryProgress(sys.stderr.isatty())


def run_document(store: Store, result: RunResult) -> dict[str, Any]:
    """One run as printed and as --json: its run record's figures when it left one (the one
    source of truth), the plan's when it did not (a dry run); nulls rather than missing keys."""
    from audience_sync.state import queries

    document = result.as_dict()
    record = queries.run_record(store, result.run_id) if result.run_id is not None else None
    if record is not None:
        # The record keeps four of the skip reasons; the run counted them all.
        document.update({k: v for k, v in record.as_dict().items() if k != "skipped"})
    else:
        document.update({"clock": None, "finished_at": None, "forced": None})
    return document


def _print_result(run: dict[str, Any], dry_run: bool) -> None:
    """One line from the run's document (its run record's figures)."""
    skipped = run["skipped"]
    held = run["status"] == "held"
    status = ("plan, held by the guard" if held else "plan") if dry_run and run["status"] in (
        "planned", "held") else run["status"]
    parts = [f"{run['key']}: {run['kind']} {status}" + (
        f" (run #{run['run_id']})" if run["run_id"] is not None else ""),
             f"{run['members']} {'accounts' if run['level'] == 'account' else 'members'} "
             f"(+{run['entered']} -{run['exited']} ~{run['changed']})"]
    fan = run["fan_out"]
    if fan is not None:
        parts.append(f"{fan['users']} users (+{fan['entered']} -{fan['exited']} "
                     f"~{fan['changed']})")
    if dry_run:
        per = run["per_destination"]
        sends = max(per.values(), default=0)
        who = "a forced run" if held else "it"
        parts.append(f"{who} would send {sends} to each of {', '.join(sorted(per))} "
                     f"({run['queued']} deliveries)" if per else "no destinations")
    else:
        parts.append(f"{run['queued']} queued")
    total = sum(skipped.values())
    if total:
        reasons = ", ".join(f"{reason.replace('_', ' ')} {n}"
                            for reason, n in skipped.items())
        parts.append(f"skipped {total} rows ({reasons})")
    print(", ".join(parts))
    if run["error"]:
        print(f"  {run['error']}", file=sys.stderr)
    if dry_run:
        if run["sample_entered"]:
            print(f"  would enter: {', '.join(run['sample_entered'])}")
        if run["sample_exited"]:
            print(f"  would exit: {', '.join(run['sample_exited'])}")


@app.command()
def sync(
    ctx: typer.Context,
    audiences: list[str] = typer.Argument(None, help="Names or keys; all when omitted."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    force: bool = typer.Option(False, "--force", help="Apply a run the removal guard held."),
    no_wait: bool = NO_WAIT_OPTION,
    wait: str = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Evaluate audiences now, whatever their cadence, and deliver the changes.

    Exit codes: 0 done, 1 a run or a delivery failed, 2 bad usage or config, 3 held by the
    removal guard."""
    _execute(ctx, audiences or [], resync=False, dry_run=dry_run, force=force, as_json=as_json,
             no_wait=no_wait, wait=wait)


@app.command()
def resync(
    ctx: typer.Context,
    audience: str = typer.Argument(..., help="Name or key."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    force: bool = typer.Option(False, "--force", help="Apply a run the removal guard held."),
    no_wait: bool = NO_WAIT_OPTION,
    wait: str = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Send every current member again, and false to those who left since the last run.

    Exit codes as for sync."""
    _execute(ctx, [audience], resync=True, dry_run=dry_run, force=force, as_json=as_json,
             no_wait=no_wait, wait=wait)


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
