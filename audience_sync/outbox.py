"""The outbox: pending deliveries, sent in batches, marked sent only once acknowledged.

Each destination drains in a thread of its own, so a slow or failing destination never holds
back the others. On PostgreSQL a batch is claimed with FOR UPDATE SKIP LOCKED and its row locks
are held until its outcomes are recorded: several processes can drain one outbox and no row is
sent by two of them at once. A crash before the outcomes commit leaves the rows pending, to be
sent again (at-least-once, same messageId).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    String,
    and_,
    any_,
    bindparam,
    func,
    or_,
    select,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from audience_sync import schema as t
from audience_sync.clock import Clock, utcnow
from audience_sync.config import Config, JsonlDestination
from audience_sync.destinations import Destination, Outcome, make_destination, wire_stats
from audience_sync.errors import AudienceSyncError
from audience_sync.messages import Delivery
from audience_sync.store import Store

log = logging.getLogger("audience_sync.delivery")

# Used for destinations whose config has no `retry_later` (jsonl, injected clients).
DEFAULT_RETRY_LATER = timedelta(minutes=1)


@dataclass
class DestinationReport:
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "deferred": self.deferred,
                "requests": self.requests, "retries": self.retries,
                "throttled": self.throttled, "error": self.error}


@dataclass
class DrainReport:
    destinations: dict[str, DestinationReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.failed == 0 and r.error is None for r in self.destinations.values())

    def as_dict(self) -> dict[str, Any]:
        return {name: r.as_dict() for name, r in self.destinations.items()}


# observed_at is read raw and converted once per distinct value (a run's rows share one):
# the per-row datetime processing was a good part of a large drain's CPU time.
_COLUMNS = (t.deliveries.c.id, t.computations.c.key, t.computations.c.kind,
            t.deliveries.c.run_id, t.deliveries.c.destination, t.deliveries.c.user_id,
            t.deliveries.c.value, t.deliveries.c.email, t.deliveries.c.name,
            t.deliveries.c.title, t.deliveries.c.company_id,
            type_coerce(t.deliveries.c.observed_at, String).label("observed_at"),
            t.deliveries.c.attempts)


@functools.lru_cache(maxsize=256)
def _utc(value: str | datetime) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def load_batch(conn: Connection, destination: str, limit: int, now: datetime,
               computation_ids: Collection[int] | None = None, *,
               claim: bool = False, after_id: int = 0) -> list[Delivery]:
    """The next due pending deliveries of one destination, oldest first.

    claim: lock them (PostgreSQL, FOR UPDATE SKIP LOCKED) until the transaction ends; rows
    another drain holds are skipped, not waited for.
    """
    d, c = t.deliveries, t.computations
    query = (
        select(*_COLUMNS)
        .join(c, c.c.id == d.c.computation_id)
        .where(d.c.destination == destination, d.c.status == "pending", d.c.id > after_id,
               or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now))
        .order_by(d.c.id)
        .limit(limit)
    )
    if computation_ids is not None:
        query = query.where(d.c.computation_id.in_(computation_ids))
    if claim:
        query = query.with_for_update(skip_locked=True, of=d)
    # Plain DBAPI tuples: no column here has a result processor, and a Row per delivery was a
    # good part of a large drain's CPU time.
    result = conn.execute(query)
    try:
        rows = result.cursor.fetchall()
    finally:
        result.close()
    return [Delivery(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                     _utc(r[11]), r[12]) for r in rows]


def _id_in(conn: Connection, ids: list[int]) -> ColumnElement[bool]:
    """`deliveries.id` among `ids`, as one bound value: an IN list of thousands of parameters
    costs more to compile and bind than the UPDATE costs to run."""
    column = t.deliveries.c.id
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, ids, type_=ARRAY(BigInteger)))
    if conn.dialect.name == "sqlite":
        listed = func.json_each(json.dumps(ids)).table_valued("value")
        return column.in_(select(listed.c.value))
    return column.in_(ids)


def record_outcomes(conn: Connection, outcomes: list[Outcome], now: datetime,
                    retry_later: timedelta = DEFAULT_RETRY_LATER) -> None:
    """Write what became of each delivery. Only pending rows change: a delivery superseded
    while in flight stays superseded (its newer value is queued)."""
    d = t.deliveries
    pending = d.c.status == "pending"
    for attempts in sorted({o.attempts for o in outcomes if o.ok}):
        ids = [o.delivery_id for o in outcomes if o.ok and o.attempts == attempts]
        conn.execute(update(d).where(_id_in(conn, ids), pending).values(
            status="sent", sent_at=now, attempts=d.c.attempts + attempts, last_error=None,
            next_attempt_at=None))
    groups: dict[tuple[str, str | None, datetime | None, int], list[int]] = {}
    for o in outcomes:
        key: tuple[str, str | None, datetime | None, int]
        if o.ok:
            continue
        if o.permanent:
            key = ("failed", o.error, None, o.attempts)
        elif o.halt:
            # Bad credentials: nothing was wrong with the delivery; it waits for a fixed token.
            key = ("pending", o.error, None, o.attempts)
        else:
            wait = timedelta(seconds=o.retry_after) if o.retry_after is not None else retry_later
            key = ("pending", o.error, now + max(wait, retry_later), o.attempts)
        groups.setdefault(key, []).append(o.delivery_id)
    for (status, error, next_at, attempts), ids in groups.items():
        conn.execute(update(d).where(_id_in(conn, ids), pending).values(
            status=status, attempts=d.c.attempts + attempts, last_error=error,
            next_attempt_at=next_at))


def mark_initial_syncs_complete(conn: Connection) -> None:
    """An initial sync is complete once none of its deliveries is pending any more."""
    c, d = t.computations, t.deliveries
    pending = select(d.c.id).where(d.c.computation_id == c.c.id, d.c.status == "pending")
    conn.execute(update(c).where(c.c.initial_state == "delivering", ~pending.exists())
                 .values(initial_state="complete"))


def requeue_failed(conn: Connection, computation_ids: Collection[int] | None = None,
                   destination: str | None = None) -> tuple[int, int]:
    """Failed deliveries back to pending; (re-queued, superseded).

    A failed delivery with a newer delivery for the same audience, user and destination is
    marked superseded instead: re-sending it would overwrite the newer value.
    """
    d = t.deliveries
    newer = d.alias("newer")
    condition = [d.c.status == "failed"]
    if computation_ids is not None:
        condition.append(d.c.computation_id.in_(computation_ids))
    if destination is not None:
        condition.append(d.c.destination == destination)
    has_newer = select(newer.c.id).where(
        newer.c.computation_id == d.c.computation_id, newer.c.user_id == d.c.user_id,
        newer.c.destination == d.c.destination, newer.c.id > d.c.id,
        newer.c.status != "superseded").exists()
    superseded = conn.execute(update(d).where(and_(*condition), has_newer)
                              .values(status="superseded")).rowcount
    requeued = conn.execute(update(d).where(and_(*condition))
                            .values(status="pending", next_attempt_at=None)).rowcount
    return int(requeued), int(superseded)


def count_pending(conn: Connection, destination: str,
                  computation_ids: Collection[int] | None) -> int:
    d = t.deliveries
    query = select(func.count()).where(d.c.destination == destination, d.c.status == "pending")
    if computation_ids is not None:
        query = query.where(d.c.computation_id.in_(computation_ids))
    return int(conn.execute(query).scalar_one())


def drain(store: Store, config: Config, *, keys: Collection[str] | None = None,
          clients: Mapping[str, Destination] | None = None,
          clock: Clock = utcnow) -> DrainReport:
    """Send every due pending delivery (of the given audiences, or all configured) to its
    destination, each destination in a thread of its own."""
    wanted = [c for c in config.computations if keys is None or c.key in keys]
    rows = {row.key: row.id for row in store.computations()}
    # Only configured audiences: an orphaned one sends nothing more.
    comp_ids = [rows[c.key] for c in wanted if c.key in rows]
    names = sorted({dest for comp in wanted for dest in comp.destinations})
    report = DrainReport({name: DestinationReport() for name in names})
    if names:
        with ThreadPoolExecutor(len(names), thread_name_prefix="drain") as pool:
            for name in names:
                pool.submit(_drain_guarded, store, config, name, comp_ids, clients, clock,
                            report.destinations[name])
    with store.write() as conn:
        mark_initial_syncs_complete(conn)
    return report


def _drain_guarded(store: Store, config: Config, name: str, comp_ids: list[int],
                   clients: Mapping[str, Destination] | None, clock: Clock,
                   report: DestinationReport) -> None:
    try:
        _drain_destination(store, config, name, comp_ids, clients, clock, report)
    except AudienceSyncError as exc:
        report.error = exc.message
    except Exception as exc:  # a bug in one destination must not take the others down
        log.exception("destination %s: drain failed", name)
        report.error = f"destination {name!r}: unexpected {type(exc).__name__}"
    if report.error:
        log.warning("%s", report.error)


@dataclass
class _Claim:
    batch: list[Delivery]
    conn: Connection | None  # PostgreSQL: the transaction holding the batch's row locks
    scope: ExitStack


class _Claims:
    """Successive batches of one destination, in id order; each claimed (PostgreSQL) until its
    outcomes are recorded, so the next batch can be loaded while one is on the wire."""

    def __init__(self, store: Store, name: str, limit: int, comp_ids: list[int],
                 clock: Clock, first: int | None = None) -> None:
        self.store, self.name, self.limit, self.comp_ids, self.clock = \
            store, name, limit, comp_ids, clock
        self.lock = store.dialect == "postgresql"
        self.after = 0  # a deferred delivery waits for the next drain, not this one
        self.size = limit if first is None else max(1, min(first, limit))
        self.open: list[ExitStack] = []

    def next(self) -> _Claim:
        scope = ExitStack()
        self.open.append(scope)
        conn: Connection | None = None
        if self.lock:
            conn = scope.enter_context(self.store.write())
            batch = load_batch(conn, self.name, self.size, self.clock(), self.comp_ids,
                               claim=True, after_id=self.after)
        else:
            # SQLite has one writer: holding its lock while sending would stall every run.
            with self.store.read() as read:
                batch = load_batch(read, self.name, self.size, self.clock(), self.comp_ids,
                                   after_id=self.after)
        self.size = self.limit
        if batch:
            self.after = batch[-1].id
        return _Claim(batch, conn, scope)

    def finish(self, claim: _Claim, outcomes: list[Outcome], retry_later: timedelta) -> None:
        if claim.conn is not None:
            record_outcomes(claim.conn, outcomes, self.clock(), retry_later)
        elif outcomes:
            with self.store.write() as conn:
                record_outcomes(conn, outcomes, self.clock(), retry_later)
        self.open.remove(claim.scope)
        claim.scope.close()  # commits, releasing the row locks

    def abandon(self) -> None:
        """Roll back every claim still open: its rows stay pending for the next drain."""
        for scope in self.open:
            scope.__exit__(_Abandoned, _Abandoned(), None)
        self.open.clear()


class _Abandoned(Exception):
    """Rolls back a claim whose outcomes are unknown."""


def _drain_destination(store: Store, config: Config, name: str, comp_ids: list[int],
                       clients: Mapping[str, Destination] | None, clock: Clock,
                       report: DestinationReport) -> None:
    settings = config.destinations[name]
    retry_later = (DEFAULT_RETRY_LATER if isinstance(settings, JsonlDestination)
                   else settings.retry_later)
    injected = clients is not None and name in clients
    client = clients[name] if clients is not None and injected else \
        make_destination(name, settings)
    halted = False
    # A destination that sends one claim as several concurrent requests may ask for a smaller
    # first claim, so its first request goes out sooner.
    first = getattr(client, "first_claim", None)
    claims = _Claims(store, name, client.max_batch, comp_ids, clock,
                     first if isinstance(first, int) else None)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix=f"send-{name}") as sender:
            current = claims.next()
            in_flight = sender.submit(_prepared(client, current.batch)) \
                if current.batch else None
            while in_flight is not None:
                # Loaded and encoded while `current` is on the wire; sent only once `current`
                # is answered and its outcomes are committed: claims reach the destination in
                # id order, and a crash can re-send at most the one batch on the wire.
                upcoming = claims.next()
                job = _prepared(client, upcoming.batch) if upcoming.batch else None
                outcomes = in_flight.result()
                go_on = _tally(report, outcomes, name)
                halted = not go_on and any(o.halt for o in outcomes)
                claims.finish(current, outcomes, retry_later)
                in_flight = sender.submit(job) if go_on and job is not None else None
                current = upcoming
            claims.finish(current, [], retry_later)
    finally:
        claims.abandon()
        for key, value in wire_stats(client).items():
            setattr(report, key, getattr(report, key) + value)
        if not injected:
            client.close()
    if halted:
        with store.read() as conn:
            waiting = count_pending(conn, name, comp_ids)
        report.error = f"{report.error}; {waiting} deliveries kept pending"


def _prepared(client: Destination, batch: list[Delivery]) -> Callable[[], list[Outcome]]:
    """The send of one claim, its messages built now if the destination can (`prepare`)."""
    prepare = getattr(client, "prepare", None)
    if callable(prepare):
        job = prepare(batch)
        if callable(job):
            return cast(Callable[[], list[Outcome]], job)
    return functools.partial(client.send, batch)


def _tally(report: DestinationReport, outcomes: list[Outcome], name: str) -> bool:
    """Count a batch's outcomes; False when the destination should stop for this drain."""
    sent = sum(o.ok for o in outcomes)
    report.sent += sent
    report.failed += sum(o.permanent for o in outcomes)
    deferred = [o for o in outcomes if not o.ok and not o.permanent and not o.halt]
    report.deferred += len(deferred)
    halted = next((o for o in outcomes if o.halt), None)
    if halted is not None:
        report.error = halted.error or f"destination {name!r} refused the credentials; stopped"
        return False
    if deferred and not sent:
        # Nothing got through after every retry: the destination is down; try next drain.
        log.warning("destination %s unavailable (%s); %d deliveries wait for the next drain",
                    name, deferred[0].error, len(deferred))
        return False
    return True
