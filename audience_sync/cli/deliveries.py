"""`deliveries` and `retry`: inspect the outbox and re-queue failed deliveries."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import typer

from audience_sync.cli.common import (
    JSON_OPTION,
    app,
    iso,
    open_config,
    open_store,
    print_json,
    resolve,
)
from audience_sync.cli.engine import NO_WAIT_OPTION, report_drain, take_leases
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
    queue_only: bool = typer.Option(False, "--queue-only",
                                    help="Re-queue but leave sending to the next sync or tick."),
    no_wait: bool = NO_WAIT_OPTION,
) -> None:
    """Re-queue failed deliveries and send them now, under the audiences' leases."""
    from audience_sync.drain import drain
    from audience_sync.state.outbox import requeue_failed

    config = open_config(ctx)
    key = _find(config, audience)
    _check_destination(config, destination)
    store = open_store(config)
    ids = None
    if key is not None:
        row = store.computation(key)
        ids = [row.id] if row else []
    requeued, superseded = requeue_failed(store, ids, destination)
    print(f"re-queued {requeued} failed deliveries"
          + (f" ({superseded} superseded by newer changes)" if superseded else ""))
    if queue_only or not requeued:
        return
    # Under the same leases sync and the daemon take: on SQLite they alone keep a delivery
    # from being sent by this drain and a daemon's at once.
    with ExitStack() as stack:
        leases = take_leases(stack, store, resolve(config, [key] if key else []), no_wait)
        report = drain(store, config, leases)
    report_drain(report, as_json=False)
    if not report.ok:
        raise typer.Exit(1)
