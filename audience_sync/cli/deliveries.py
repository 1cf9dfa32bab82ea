"""`deliveries` and `retry`: inspect the outbox and re-queue failed deliveries."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import typer

from audience_sync.cli.common import (
    JSON_OPTION,
    SCHEMA_VERSION,
    app,
    iso,
    open_config,
    open_store,
    print_json,
    resolve,
)
from audience_sync.cli.engine import (
    NO_WAIT_OPTION,
    WAIT_OPTION,
    delivery_progress,
    parse_wait,
    report_drain,
    take_leases,
)
from audience_sync.errors import UsageError
from audience_sync.states import DeliveryStatus

if TYPE_CHECKING:
    from audience_sync.config import Config


def _find(config: Config, name: str | None) -> str | None:
    if name is None:
        return None
    return resolve(config, [name])[0].key


def _check_destination(config: Config, destination: str | None) -> None:
    if destination is not None and destination not in config.destinations:
        known = ", ".join(config.destinations)
        raise UsageError(f"unknown destination {destination!r} (known: {known})")


@app.command()
def deliveries(
    ctx: typer.Context,
    audience: str = typer.Argument(None, help="Name or key; every audience when omitted."),
    failed: bool = typer.Option(False, "--failed", help="Only failed deliveries."),
    destination: str = typer.Option(None, "--destination", help="Only this destination."),
    limit: int = typer.Option(100, "--limit", min=1, help="At most N deliveries, oldest first."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Deliveries not sent yet (pending and failed), with attempts and the last error."""
    from audience_sync.state import queries

    config = open_config(ctx)
    key = _find(config, audience)
    _check_destination(config, destination)
    store = open_store(config)
    items: list[dict[str, Any]] = [{
        "id": row.id, "key": row.key, "destination": row.destination,
        "user_id": row.user_id, "value": json.loads(row.value), "status": row.status,
        "attempts": row.attempts, "next_attempt_at": iso(row.next_attempt_at),
        "last_error": row.last_error, "run_id": row.run_id,
        "observed_at": iso(row.observed_at),
    } for row in queries.unsent_deliveries(store, failed_only=failed, key=key,
                                           destination=destination, limit=limit)]
    if as_json:
        print_json(items)
        return
    for item in items:
        line = (f"#{item['id']} {item['key']} -> {item['destination']} {item['user_id']}="
                f"{json.dumps(item['value'])} {item['status']}, {item['attempts']} attempts")
        if item["next_attempt_at"] and item["status"] == DeliveryStatus.PENDING:
            line += f", next at {item['next_attempt_at']}"
        if item["last_error"]:
            line += f": {item['last_error']}"
        print(line)
    if not items:
        print("(no failed deliveries)" if failed else "(nothing waiting to be sent)",
              file=sys.stderr)


@app.command()
def retry(
    ctx: typer.Context,
    audience: str = typer.Argument(None, help="Name or key; every audience when omitted."),
    destination: str = typer.Option(None, "--destination", help="Only this destination."),
    drain_now: bool = typer.Option(False, "--drain",
                                   help="Also send them now, in the foreground, with progress, "
                                   "under the audiences' leases."),
    queue_only: bool = typer.Option(False, "--queue-only", hidden=True,
                                    help="What retry does without --drain (kept for scripts)."),
    no_wait: bool = NO_WAIT_OPTION,
    wait: str = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Re-queue failed deliveries: the daemon or the next sync sends them (--drain: now)."""
    from audience_sync.state.outbox import requeue_failed

    max_wait = parse_wait(wait)
    if drain_now and queue_only:
        raise UsageError("--drain and --queue-only contradict each other")
    config = open_config(ctx)
    key = _find(config, audience)
    _check_destination(config, destination)
    store = open_store(config)
    ids = None
    if key is not None:
        row = store.computation(key)
        ids = [row.id] if row else []
    requeued, superseded = requeue_failed(store, ids, destination)
    document: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "ok": True,
                                "key": key, "destination": destination,
                                "requeued": requeued, "superseded": superseded,
                                "drained": False, "deliveries": None}
    if not as_json:
        print(f"re-queued {requeued} failed deliveries"
              + (f" ({superseded} superseded by newer changes)" if superseded else "")
              + ("" if drain_now or not requeued
                 else "; the daemon or the next sync sends them (--drain: now)"))
    if drain_now and requeued:
        from audience_sync.drain import drain

        # Under the same leases sync and the daemon take: on SQLite they alone keep a
        # delivery from being sent by this drain and a daemon's at once.
        with ExitStack() as stack:
            leases = take_leases(stack, store, resolve(config, [key] if key else []), no_wait,
                                 max_wait)
            with delivery_progress() as progress:
                report = drain(store, config, leases, progress=progress.tracker)
        report_drain(report, as_json)
        document.update(ok=report.ok, drained=True, deliveries=report.as_dict())
    if as_json:
        print_json(document)
    if not document["ok"]:
        raise typer.Exit(1)
