"""The outbox: pending deliveries, sent in batches, marked sent only once acknowledged.

Each destination drains in a thread of its own, so a slow or failing destination never holds
back the others; a destination with a `window` keeps that many claims on the wire at once, each
recorded as soon as it is answered. On PostgreSQL a claim is taken with FOR UPDATE SKIP LOCKED
and its row locks are held until its outcomes are recorded: several processes can drain one
outbox and no row is sent by two of them at once. SQLite takes no row locks: there the
audience's lease is what makes a claim exclusive, so a drain is given the leases it holds and
drains only those audiences, checking before each claim that no lease was taken over. A crash
before the outcomes commit leaves the rows pending, to be sent again (at-least-once, same
messageId): at most the claims on the wire.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    Select,
    String,
    Text,
    Update,
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

from audience_sync.clock import Clock, utcnow
from audience_sync.config import Config, JsonlDestination
from audience_sync.destinations import Destination, Outcome, make_destination, wire_stats
from audience_sync.errors import AudienceSyncError, LeaseLost
from audience_sync.leases import Lease
from audience_sync.messages import Delivery
from audience_sync.ratelimit import shared_limiter
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from audience_sync.states import DeliveryStatus, InitialState

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
    # Pending deliveries left behind by a drain that tried and did not deliver everything
    # (deferred or stopped), and the last reason a delivery was deferred.
    waiting: int = 0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "deferred": self.deferred,
                "requests": self.requests, "retries": self.retries,
                "throttled": self.throttled, "error": self.error, "waiting": self.waiting,
                "reason": self.reason}


@dataclass
class DrainReport:
    destinations: dict[str, DestinationReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing failed, and nothing this drain tried is still waiting."""
        return all(r.failed == 0 and r.error is None and r.waiting == 0
                   for r in self.destinations.values())

    def waiting_lines(self) -> list[str]:
        """One line per destination that left deliveries waiting: how many, and why."""
        return [f"{name}: {r.waiting} deliveries still waiting ({r.error or r.reason})"
                for name, r in self.destinations.items() if r.waiting]

    def as_dict(self) -> dict[str, Any]:
        return {name: r.as_dict() for name, r in self.destinations.items()}


# In Delivery's field order. observed_at is read raw (Delivery converts it on use, once per
# distinct value): the per-row datetime processing was a good part of a large drain's CPU.
_COLUMNS = (t.deliveries.c.id, t.computations.c.key, t.computations.c.kind,
            t.deliveries.c.run_id, t.deliveries.c.destination, t.deliveries.c.user_id,
            t.deliveries.c.value, t.deliveries.c.email, t.deliveries.c.name,
            t.deliveries.c.title, t.deliveries.c.company_id,
            type_coerce(t.deliveries.c.observed_at, String).label("observed_at"),
            t.deliveries.c.attempts)


@functools.cache
def _batch_query(claim: bool, filtered: bool) -> Select[Any]:
    """The statement of load_batch, built once: building and hashing a fresh statement per
    claim cost more than running it. Bound at execution: destination, after, now, limit (and
    comp_ids when filtered)."""
    d, c = t.deliveries, t.computations
    query = (
        select(*_COLUMNS)
        .join(c, c.c.id == d.c.computation_id)
        .where(d.c.destination == bindparam("destination"), t.status_is(DeliveryStatus.PENDING),
               d.c.id > bindparam("after"),
               or_(d.c.next_attempt_at.is_(None),
                   d.c.next_attempt_at <= bindparam("now", type_=t.UTCDateTime)))
        .order_by(d.c.id)
        .limit(bindparam("limit"))
    )
    if filtered:
        query = query.where(d.c.computation_id.in_(bindparam("comp_ids", expanding=True)))
    if claim:
        query = query.with_for_update(skip_locked=True, of=d)
    return query


def load_batch(conn: Connection, destination: str, limit: int, now: datetime,
               computation_ids: Collection[int] | None = None, *,
               claim: bool = False, after_id: int = 0) -> list[Delivery]:
    """The next due pending deliveries of one destination, oldest first.

    claim: lock them (PostgreSQL, FOR UPDATE SKIP LOCKED) until the transaction ends; rows
    another drain holds are skipped, not waited for.
    """
    params: dict[str, Any] = {"destination": destination, "after": after_id, "now": now,
                              "limit": limit}
    if computation_ids is not None:
        params["comp_ids"] = list(computation_ids)
    # Plain DBAPI tuples: no column here has a result processor, and a Row per delivery was a
    # good part of a large drain's CPU time.
    result = conn.execute(_batch_query(claim, computation_ids is not None), params)
    try:
        rows = result.cursor.fetchall()
    finally:
        result.close()
    return list(map(Delivery._make, rows))


def _ids(dialect: str) -> Any:
    """A criterion `deliveries.id` among the ids bound as `ids`, as one bound value: an IN list
    of thousands of parameters costs more to compile and bind than the UPDATE costs to run."""
    column = t.deliveries.c.id
    if dialect == "postgresql":
        return column == any_(bindparam("ids", type_=ARRAY(BigInteger)))
    if dialect == "sqlite":
        listed = func.json_each(bindparam("ids", type_=String)).table_valued("value")
        return column.in_(select(listed.c.value))
    return column.in_(bindparam("ids", expanding=True))


def _ids_value(dialect: str, ids: list[int]) -> object:
    return json.dumps(ids) if dialect == "sqlite" else ids


@functools.cache
def _mark_sent(dialect: str) -> Update:
    d = t.deliveries
    return update(d).where(_ids(dialect), t.status_is(DeliveryStatus.PENDING)).values(
        status=DeliveryStatus.SENT, sent_at=bindparam("now", type_=t.UTCDateTime),
        attempts=d.c.attempts + bindparam("attempts", type_=Integer), last_error=None,
        next_attempt_at=None)


@functools.cache
def _mark_unsent(dialect: str) -> Update:
    d = t.deliveries
    return update(d).where(_ids(dialect), t.status_is(DeliveryStatus.PENDING)).values(
        status=bindparam("status", type_=String), last_error=bindparam("error", type_=Text),
        attempts=d.c.attempts + bindparam("attempts", type_=Integer),
        next_attempt_at=bindparam("next_at", type_=t.UTCDateTime))


def record_outcomes(conn: Connection, outcomes: list[Outcome], now: datetime,
                    retry_later: timedelta = DEFAULT_RETRY_LATER) -> None:
    """Write what became of each delivery. Only pending rows change: a delivery superseded
    while in flight stays superseded (its newer value is queued)."""
    dialect = conn.dialect.name
    sent: dict[int, list[int]] = {}
    groups: dict[tuple[str, str | None, datetime | None, int], list[int]] = {}
    for o in outcomes:
        key: tuple[str, str | None, datetime | None, int]
        if o.ok:
            sent.setdefault(o.attempts, []).append(o.delivery_id)
            continue
        if o.permanent:
            key = (DeliveryStatus.FAILED, o.error, None, o.attempts)
        elif o.halt:
            # Bad credentials: nothing was wrong with the delivery; it waits for a fixed token.
            key = (DeliveryStatus.PENDING, o.error, None, o.attempts)
        else:
            wait = timedelta(seconds=o.retry_after) if o.retry_after is not None else retry_later
            key = (DeliveryStatus.PENDING, o.error, now + max(wait, retry_later), o.attempts)
        groups.setdefault(key, []).append(o.delivery_id)
    for attempts, ids in sorted(sent.items()):
        conn.execute(_mark_sent(dialect), {"ids": _ids_value(dialect, ids), "now": now,
                                           "attempts": attempts})
    for (status, error, next_at, attempts), ids in groups.items():
        conn.execute(_mark_unsent(dialect), {"ids": _ids_value(dialect, ids), "status": status,
                                             "error": error, "attempts": attempts,
                                             "next_at": next_at})


def mark_initial_syncs_complete(conn: Connection) -> None:
    """An initial sync is complete once none of its deliveries is pending any more."""
    c, d = t.computations, t.deliveries
    pending = select(d.c.id).where(d.c.computation_id == c.c.id,
                                  t.status_is(DeliveryStatus.PENDING))
    conn.execute(update(c).where(c.c.initial_state == InitialState.DELIVERING, ~pending.exists())
                 .values(initial_state=InitialState.COMPLETE))


def requeue_failed(conn: Connection, computation_ids: Collection[int] | None = None,
                   destination: str | None = None) -> tuple[int, int]:
    """Failed deliveries back to pending; (re-queued, superseded).

    A failed delivery with a newer delivery for the same audience, user and destination is
    marked superseded instead: re-sending it would overwrite the newer value.
    """
    d = t.deliveries
    newer = d.alias("newer")
    condition = [t.status_is(DeliveryStatus.FAILED)]
    if computation_ids is not None:
        condition.append(d.c.computation_id.in_(computation_ids))
    if destination is not None:
        condition.append(d.c.destination == destination)
    has_newer = select(newer.c.id).where(
        newer.c.computation_id == d.c.computation_id, newer.c.user_id == d.c.user_id,
        newer.c.destination == d.c.destination, newer.c.id > d.c.id,
        newer.c.status != DeliveryStatus.SUPERSEDED).exists()
    superseded = conn.execute(update(d).where(and_(*condition), has_newer)
                              .values(status=DeliveryStatus.SUPERSEDED)).rowcount
    requeued = conn.execute(update(d).where(and_(*condition))
                            .values(status=DeliveryStatus.PENDING, next_attempt_at=None)).rowcount
    return int(requeued), int(superseded)


def count_pending(conn: Connection, destination: str,
                  computation_ids: Collection[int] | None) -> int:
    d = t.deliveries
    query = select(func.count()).where(d.c.destination == destination,
                                       t.status_is(DeliveryStatus.PENDING))
    if computation_ids is not None:
        query = query.where(d.c.computation_id.in_(computation_ids))
    return int(conn.execute(query).scalar_one())


def drain(store: Store, config: Config, leases: Sequence[Lease], *,
          clients: Mapping[str, Destination] | None = None,
          clock: Clock = utcnow) -> DrainReport:
    """Send every due pending delivery of the leased audiences to its destination, each
    destination in a thread of its own.

    Only audiences whose lease the caller holds are drained (and only configured ones: an
    orphaned audience sends nothing more); a lease taken over meanwhile stops the drain.
    """
    held = {lease.key: lease for lease in leases}
    wanted = [c for c in config.computations if c.key in held]
    leased = [held[c.key] for c in wanted]
    names = sorted({dest for comp in wanted for dest in comp.destinations})
    report = DrainReport({name: DestinationReport() for name in names})
    if names:
        with ThreadPoolExecutor(len(names), thread_name_prefix="drain") as pool:
            for name in names:
                pool.submit(_drain_guarded, store, config, name, leased, clients, clock,
                            report.destinations[name])
    with store.write() as conn:
        mark_initial_syncs_complete(conn)
    return report


def _drain_guarded(store: Store, config: Config, name: str, leases: list[Lease],
                   clients: Mapping[str, Destination] | None, clock: Clock,
                   report: DestinationReport) -> None:
    try:
        _drain_destination(store, config, name, leases, clients, clock, report)
    except AudienceSyncError as exc:
        report.error = exc.message
    except Exception as exc:  # a bug in one destination must not take the others down
        log.exception("destination %s: drain failed", name)
        report.error = f"destination {name!r}: unexpected {type(exc).__name__}"
    if report.error:
        log.warning("%s", report.error)


def check_leases(conn: Connection, leases: Sequence[Lease]) -> None:
    """:raises LeaseLost: another process was granted one of these audiences' leases since
    (its fencing token moved on): what it drains, this drain must not."""
    c = t.computations
    current = dict(conn.execute(select(c.c.id, c.c.fencing_token).where(
        c.c.id.in_([lease.computation_id for lease in leases]))).tuples().all())
    lost = [lease.key for lease in leases if current.get(lease.computation_id) != lease.token]
    if lost:
        raise LeaseLost(f"{', '.join(lost)}: the lease was taken over by another process; "
                        "this drain stopped")


@dataclass
class _Claim:
    batch: list[Delivery]
    conn: Connection | None  # PostgreSQL: the transaction holding the batch's row locks
    scope: ExitStack

    @functools.cached_property
    def users(self) -> set[tuple[str, str]]:
        return {(d.computation_key, d.user_id) for d in self.batch}


def _claim_size(client: Destination) -> int:
    """The destination's preferred claim (`claim_size`, e.g. about one request's worth of
    messages), within its `max_batch`."""
    size = getattr(client, "claim_size", None)
    if isinstance(size, int):
        return max(1, min(size, client.max_batch))
    return client.max_batch


class _Claims:
    """Successive batches of one destination, loaded one at a time in id order; each claimed
    (PostgreSQL) until its outcomes are recorded."""

    def __init__(self, store: Store, name: str, client: Destination, leases: list[Lease],
                 clock: Clock) -> None:
        self.store, self.name, self.client, self.leases, self.clock = \
            store, name, client, leases, clock
        self.comp_ids = [lease.computation_id for lease in leases]
        self.lock = store.dialect == "postgresql"
        self.after = 0  # a deferred delivery waits for the next drain, not this one
        self.open: set[ExitStack] = set()
        self.guard = threading.Lock()  # over `open`: claims finish on several threads

    def next(self) -> _Claim:
        """The next claim; called by one thread at a time."""
        scope = ExitStack()
        with self.guard:
            self.open.add(scope)
        conn: Connection | None = None
        size = _claim_size(self.client)
        if self.lock:
            conn = scope.enter_context(self.store.write())
            check_leases(conn, self.leases)
            batch = load_batch(conn, self.name, size, self.clock(), self.comp_ids,
                               claim=True, after_id=self.after)
        else:
            # SQLite has one writer: holding its lock while sending would stall every run.
            # The leases alone keep other drains off these rows.
            with self.store.read() as read:
                check_leases(read, self.leases)
                batch = load_batch(read, self.name, size, self.clock(), self.comp_ids,
                                   after_id=self.after)
        if batch:
            self.after = batch[-1].id
        return _Claim(batch, conn, scope)

    def finish(self, claim: _Claim, outcomes: list[Outcome], retry_later: timedelta) -> None:
        if claim.conn is not None:
            record_outcomes(claim.conn, outcomes, self.clock(), retry_later)
        elif outcomes:
            with self.store.write() as conn:
                record_outcomes(conn, outcomes, self.clock(), retry_later)
        with self.guard:
            self.open.discard(claim.scope)
        claim.scope.close()  # commits, releasing the row locks

    def abandon(self) -> None:
        """Roll back every claim still open: its rows stay pending for the next drain."""
        with self.guard:
            scopes, self.open = self.open, set()
        for scope in scopes:
            scope.__exit__(_Abandoned, _Abandoned(), None)


class _Abandoned(Exception):
    """Rolls back a claim whose outcomes are unknown."""


class _Pipeline:
    """The drain of one destination by `window` workers side by side, each taking the next
    claim, sending it and recording its outcomes before it takes another.

    Claims load one at a time, in id order. A claim carrying a user whose older value is
    still on the wire waits for that answer first. So at most `window` claims are sent and
    not yet recorded: a crash re-sends at most those.
    """

    def __init__(self, claims: _Claims, client: Destination, report: DestinationReport,
                 name: str, retry_later: timedelta) -> None:
        self.claims, self.client, self.report, self.name, self.retry_later = \
            claims, client, report, name, retry_later
        self.loading = threading.Lock()
        self.changed = threading.Condition()  # over on_wire, stopped, halted and the report
        self.on_wire: list[_Claim] = []
        self.stopped = False
        self.halted = False

    def work(self) -> None:
        try:
            while (claim := self._take()) is not None:
                outcomes = self.client.send(claim.batch)
                with self.changed:
                    if not _tally(self.report, outcomes, self.name):
                        self.stopped = True
                        self.halted = self.halted or any(o.halt for o in outcomes)
                self.claims.finish(claim, outcomes, self.retry_later)
                with self.changed:
                    self.on_wire.remove(claim)
                    self.changed.notify_all()
        except BaseException:
            with self.changed:
                self.stopped = True
                self.changed.notify_all()
            raise

    def _take(self) -> _Claim | None:
        with self.loading:
            if self.stopped:
                return None
            claim = self.claims.next()
            with self.changed:
                if claim.batch:
                    self.changed.wait_for(lambda: self.stopped or all(
                        claim.users.isdisjoint(other.users) for other in self.on_wire))
                if claim.batch and not self.stopped:
                    self.on_wire.append(claim)
                    return claim
                self.stopped = True  # nothing left to send, or told to stop
            self.claims.finish(claim, [], self.retry_later)
            return None


def _drain_destination(store: Store, config: Config, name: str, leases: list[Lease],
                       clients: Mapping[str, Destination] | None, clock: Clock,
                       report: DestinationReport) -> None:
    settings = config.destinations[name]
    retry_later = (DEFAULT_RETRY_LATER if isinstance(settings, JsonlDestination)
                   else settings.retry_later)
    injected = clients is not None and name in clients
    # Every drain of a destination, daemon or CLI, takes its requests from the one budget in
    # the state store: a CLI sync beside a daemon must not double the destination's rate.
    client = clients[name] if clients is not None and injected else \
        make_destination(name, settings, limiter=shared_limiter(store, name, settings))
    # A destination may keep several claims on the wire at once (`window`): each claim's
    # outcomes commit as soon as it is answered, while the others keep the destination busy.
    window = getattr(client, "window", 1)
    window = window if isinstance(window, int) and window > 0 else 1
    claims = _Claims(store, name, client, leases, clock)
    pipeline = _Pipeline(claims, client, report, name, retry_later)
    try:
        if window == 1:
            pipeline.work()
        else:
            with ThreadPoolExecutor(window, thread_name_prefix=f"send-{name}") as workers:
                for worker in [workers.submit(pipeline.work) for _ in range(window)]:
                    worker.result()
    finally:
        claims.abandon()
        for key, value in wire_stats(client).items():
            setattr(report, key, getattr(report, key) + value)
        if not injected:
            client.close()
    if report.deferred or report.error or pipeline.halted:
        with store.read() as conn:
            report.waiting = count_pending(conn, name, claims.comp_ids)
    if pipeline.halted:
        report.error = f"{report.error}; {report.waiting} deliveries kept pending"


_OK, _PERMANENT = operator.itemgetter(1), operator.itemgetter(2)  # Outcome.ok, .permanent


def _tally(report: DestinationReport, outcomes: list[Outcome], name: str) -> bool:
    """Count a batch's outcomes; False when the destination should stop for this drain."""
    sent = sum(map(_OK, outcomes))
    report.sent += sent
    if sent == len(outcomes):
        return True
    report.failed += sum(map(_PERMANENT, outcomes))
    deferred = [o for o in outcomes if not o.ok and not o.permanent and not o.halt]
    report.deferred += len(deferred)
    if deferred:
        report.reason = deferred[-1].error
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
