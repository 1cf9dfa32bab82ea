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
import operator
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

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
        .where(d.c.destination == bindparam("destination"), t.status_in("pending"),
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
    return update(d).where(_ids(dialect), t.status_in("pending")).values(
        status="sent", sent_at=bindparam("now", type_=t.UTCDateTime),
        attempts=d.c.attempts + bindparam("attempts", type_=Integer), last_error=None,
        next_attempt_at=None)


@functools.cache
def _mark_unsent(dialect: str) -> Update:
    d = t.deliveries
    return update(d).where(_ids(dialect), t.status_in("pending")).values(
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
            key = ("failed", o.error, None, o.attempts)
        elif o.halt:
            # Bad credentials: nothing was wrong with the delivery; it waits for a fixed token.
            key = ("pending", o.error, None, o.attempts)
        else:
            wait = timedelta(seconds=o.retry_after) if o.retry_after is not None else retry_later
            key = ("pending", o.error, now + max(wait, retry_later), o.attempts)
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
    pending = select(d.c.id).where(d.c.computation_id == c.c.id, t.status_in("pending"))
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
    condition = [t.status_in("failed")]
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
    query = select(func.count()).where(d.c.destination == destination, t.status_in("pending"))
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
    """Successive batches of one destination, in id order; each claimed (PostgreSQL) until its
    outcomes are recorded, so the next batches can be loaded while others are on the wire."""

    def __init__(self, store: Store, name: str, client: Destination, comp_ids: list[int],
                 clock: Clock) -> None:
        self.store, self.name, self.client, self.comp_ids, self.clock = \
            store, name, client, comp_ids, clock
        self.lock = store.dialect == "postgresql"
        self.after = 0  # a deferred delivery waits for the next drain, not this one
        self.open: list[ExitStack] = []

    def next(self) -> _Claim:
        scope = ExitStack()
        self.open.append(scope)
        conn: Connection | None = None
        size = _claim_size(self.client)
        if self.lock:
            conn = scope.enter_context(self.store.write())
            batch = load_batch(conn, self.name, size, self.clock(), self.comp_ids,
                               claim=True, after_id=self.after)
        else:
            # SQLite has one writer: holding its lock while sending would stall every run.
            with self.store.read() as read:
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
        self.open.remove(claim.scope)
        claim.scope.close()  # commits, releasing the row locks

    def abandon(self) -> None:
        """Roll back every claim still open: its rows stay pending for the next drain."""
        for scope in self.open:
            scope.__exit__(_Abandoned, _Abandoned(), None)
        self.open.clear()


class _Abandoned(Exception):
    """Rolls back a claim whose outcomes are unknown."""


class _Window:
    """The claims on the wire: at most `size` at once, none sharing a user with another (the
    older value must be answered before a newer one for the same user goes out)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.claims: dict[Future[list[Outcome]], _Claim] = {}

    def __len__(self) -> int:
        return len(self.claims)

    def admits(self, claim: _Claim) -> bool:
        if len(self.claims) >= self.size:
            return False
        if not self.claims:
            return True
        return all(claim.users.isdisjoint(other.users) for other in self.claims.values())

    def add(self, future: Future[list[Outcome]], claim: _Claim) -> None:
        self.claims[future] = claim

    def answered(self) -> tuple[_Claim, list[Outcome]]:
        """The oldest answered claim, once there is one (one at a time: the window is topped
        up after each claim's outcomes are recorded)."""
        done, _ = wait(self.claims, return_when=FIRST_COMPLETED)
        future = min(done, key=lambda f: self.claims[f].batch[0].id)
        return self.claims.pop(future), future.result()


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
    # A destination may keep several claims on the wire at once (`window`): each claim's
    # outcomes commit as soon as it is answered, while the others keep the destination busy.
    # A crash re-sends at most the claims on the wire.
    window_size = getattr(client, "window", 1)
    window = _Window(window_size if isinstance(window_size, int) and window_size > 0 else 1)
    claims = _Claims(store, name, client, comp_ids, clock)
    try:
        with ThreadPoolExecutor(window.size, thread_name_prefix=f"send-{name}") as sender:
            upcoming = claims.next()
            job = _prepared(client, upcoming.batch) if upcoming.batch else None
            go_on = True
            while True:
                # The next claim is loaded and encoded while the others are on the wire.
                while go_on and job is not None and window.admits(upcoming):
                    window.add(sender.submit(job), upcoming)
                    upcoming = claims.next()
                    job = _prepared(client, upcoming.batch) if upcoming.batch else None
                if not window:
                    break
                claim, outcomes = window.answered()
                if not _tally(report, outcomes, name):
                    go_on = False
                    halted = halted or any(o.halt for o in outcomes)
                claims.finish(claim, outcomes, retry_later)
            claims.finish(upcoming, [], retry_later)
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
