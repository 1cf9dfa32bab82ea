"""The outbox: pending deliveries, sent in batches, marked sent only once acknowledged."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, or_, select, update

from audience_sync import schema as t
from audience_sync.config import Config
from audience_sync.destinations import Destination, Outcome, make_destination
from audience_sync.errors import DestinationError
from audience_sync.messages import Delivery
from audience_sync.store import Store


@dataclass
class DestinationReport:
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    error: str | None = None


@dataclass
class DrainReport:
    destinations: dict[str, DestinationReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.failed == 0 and r.error is None for r in self.destinations.values())

    def as_dict(self) -> dict[str, Any]:
        return {name: {"sent": r.sent, "failed": r.failed, "deferred": r.deferred,
                       "error": r.error} for name, r in self.destinations.items()}


def load_batch(conn: Connection, destination: str, limit: int, now: datetime,
               computation_ids: Collection[int] | None = None) -> list[Delivery]:
    d, c = t.deliveries, t.computations
    query = (
        select(d.c.id, c.c.key, c.c.kind, d.c.run_id, d.c.destination, d.c.user_id, d.c.value,
               d.c.email, d.c.name, d.c.title, d.c.company_id, d.c.observed_at, d.c.attempts)
        .join(c, c.c.id == d.c.computation_id)
        .where(d.c.destination == destination, d.c.status == "pending",
               or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now))
        .order_by(d.c.id)
        .limit(limit)
    )
    if computation_ids is not None:
        query = query.where(d.c.computation_id.in_(computation_ids))
    return [Delivery(*row) for row in conn.execute(query)]


def record_outcomes(conn: Connection, outcomes: list[Outcome], now: datetime) -> None:
    d = t.deliveries
    sent = [o.delivery_id for o in outcomes if o.ok]
    if sent:
        # A delivery superseded meanwhile stays superseded: its newer value is queued.
        conn.execute(update(d).where(d.c.id.in_(sent), d.c.status == "pending")
                     .values(status="sent", sent_at=now, attempts=d.c.attempts + 1))
    for outcome in outcomes:
        if outcome.ok:
            continue
        conn.execute(update(d).where(and_(d.c.id == outcome.delivery_id,
                                          d.c.status == "pending")).values(
            status="failed" if outcome.permanent else "pending",
            attempts=d.c.attempts + 1, last_error=outcome.error))


def mark_initial_syncs_complete(conn: Connection) -> None:
    """An initial sync is complete once none of its deliveries is pending any more."""
    c, d = t.computations, t.deliveries
    pending = select(d.c.id).where(d.c.computation_id == c.c.id, d.c.status == "pending")
    conn.execute(update(c).where(c.c.initial_state == "delivering", ~pending.exists())
                 .values(initial_state="complete"))


def drain(store: Store, config: Config, *, keys: Collection[str] | None = None,
          clients: Mapping[str, Destination] | None = None,
          clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> DrainReport:
    """Send every due pending delivery (of the given audiences, or all) to its destination."""
    report = DrainReport()
    comp_ids: list[int] | None = None
    if keys is not None:
        rows = [store.computation(k) for k in keys]
        comp_ids = [r.id for r in rows if r is not None]
    names = sorted({dest for comp in config.computations for dest in comp.destinations
                    if keys is None or comp.key in keys})
    for name in names:
        dest_report = report.destinations.setdefault(name, DestinationReport())
        client = clients[name] if clients and name in clients else \
            make_destination(name, config.destinations[name])
        try:
            while True:
                with store.read() as conn:
                    batch = load_batch(conn, name, client.max_batch, clock(), comp_ids)
                if not batch:
                    break
                try:
                    outcomes = client.send(batch)
                except DestinationError as exc:
                    dest_report.error = exc.message
                    break
                with store.write() as conn:
                    record_outcomes(conn, outcomes, clock())
                dest_report.sent += sum(o.ok for o in outcomes)
                dest_report.failed += sum(o.permanent for o in outcomes)
                deferred = sum(not o.ok and not o.permanent for o in outcomes)
                dest_report.deferred += deferred
                if deferred:
                    break
        finally:
            if not clients or name not in clients:
                client.close()
    with store.write() as conn:
        mark_initial_syncs_complete(conn)
    return report
