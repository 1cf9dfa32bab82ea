"""The outbox in the state database: claims of pending deliveries, their outcomes, re-queueing.

On PostgreSQL a claim is taken with FOR UPDATE SKIP LOCKED and its row locks are held until
its outcomes are recorded: several processes can drain one outbox and no row is sent by two
of them at once. SQLite takes no row locks: there the audience's lease is what makes a claim
exclusive, and each claim first checks that no lease was taken over. The drain pipeline
(threads, windows, reports) is drain.py, which holds no SQL.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
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
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.clock import Clock
from audience_sync.destinations.base import Outcome
from audience_sync.errors import LeaseLost, StoreError, describe_db_error
from audience_sync.messages import Delivery
from audience_sync.state import schema as t
from audience_sync.state.leases import Lease
from audience_sync.state.store import Store
from audience_sync.states import DeliveryStatus, InitialState

# Used for destinations whose config has no `retry_later` (jsonl, injected clients).
DEFAULT_RETRY_LATER = timedelta(minutes=1)


# In Delivery's field order. observed_at is read raw (Delivery converts it on use, once per
# distinct value): the per-row datetime processing was a good part of a large drain's CPU.
_COLUMNS = (t.deliveries.c.id, t.computations.c.key, t.computations.c.kind,
            t.deliveries.c.run_id, t.deliveries.c.destination, t.deliveries.c.user_id,
            t.deliveries.c.value, t.deliveries.c.email, t.deliveries.c.name,
            t.deliveries.c.title, t.deliveries.c.company_id,
            type_coerce(t.deliveries.c.observed_at, String).label("observed_at"),
            t.deliveries.c.attempts, t.deliveries.c.call, t.deliveries.c.user_ref,
            t.deliveries.c.traits)


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


def mark_initial_syncs_complete(store: Store) -> None:
    """An initial sync is complete once none of its deliveries is pending any more."""
    c, d = t.computations, t.deliveries
    pending = select(d.c.id).where(d.c.computation_id == c.c.id,
                                  t.status_is(DeliveryStatus.PENDING))
    with store.write() as conn:
        conn.execute(update(c)
                     .where(c.c.initial_state == InitialState.DELIVERING, ~pending.exists())
                     .values(initial_state=InitialState.COMPLETE))


def requeue_failed(store: Store, computation_ids: Collection[int] | None = None,
                   destination: str | None = None) -> tuple[int, int]:
    """Failed deliveries back to pending; (re-queued, superseded).

    A failed delivery with a newer delivery for the same audience, user, destination and call
    is marked superseded instead: re-sending it would overwrite the newer value.
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
        newer.c.destination == d.c.destination, newer.c.call == d.c.call, newer.c.id > d.c.id,
        newer.c.status != DeliveryStatus.SUPERSEDED).exists()
    with store.write() as conn:
        superseded = conn.execute(update(d).where(and_(*condition), has_newer)
                                  .values(status=DeliveryStatus.SUPERSEDED)).rowcount
        requeued = conn.execute(update(d).where(and_(*condition)).values(
            status=DeliveryStatus.PENDING, next_attempt_at=None)).rowcount
    return int(requeued), int(superseded)


def count_pending(store: Store, destination: str,
                  computation_ids: Collection[int] | None) -> int:
    d = t.deliveries
    query = select(func.count()).where(d.c.destination == destination,
                                       t.status_is(DeliveryStatus.PENDING))
    if computation_ids is not None:
        query = query.where(d.c.computation_id.in_(computation_ids))
    with store.read() as conn:
        return int(conn.execute(query).scalar_one())


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
class Claim:
    batch: list[Delivery]
    conn: Connection | None  # PostgreSQL: the transaction holding the batch's row locks
    scope: ExitStack

    @functools.cached_property
    def users(self) -> set[tuple[str, str]]:
        return {(d.computation_key, d.user_id) for d in self.batch}


class Claims:
    """Successive batches of one destination, loaded one at a time in id order; each claimed
    (PostgreSQL) until its outcomes are recorded."""

    def __init__(self, store: Store, name: str, size: Callable[[], int], leases: list[Lease],
                 clock: Clock) -> None:
        self.store, self.name, self.size, self.leases, self.clock = \
            store, name, size, leases, clock
        self.comp_ids = [lease.computation_id for lease in leases]
        self.lock = store.dialect == "postgresql"
        self.after = 0  # a deferred delivery waits for the next drain, not this one
        self.open: set[ExitStack] = set()
        self.guard = threading.Lock()  # over `open`: claims finish on several threads

    def next(self) -> Claim:
        """The next claim; called by one thread at a time."""
        scope = ExitStack()
        with self.guard:
            self.open.add(scope)
        conn: Connection | None = None
        size = self.size()  # asked per claim: a destination may learn its claim size
        if self.lock:
            conn = scope.enter_context(self.store.write())
            with _store_errors():  # the claim's transaction stays open past write()'s block
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
        return Claim(batch, conn, scope)

    def finish(self, claim: Claim, outcomes: list[Outcome], retry_later: timedelta) -> None:
        with _store_errors():
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


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise StoreError(f"state database error: {describe_db_error(exc)}") from exc


class _Abandoned(Exception):
    """Rolls back a claim whose outcomes are unknown."""


