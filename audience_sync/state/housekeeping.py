"""Housekeeping: pruning old sent deliveries, forgetting an orphan, once-a-day chores.

Only the outbox shrinks here: membership history, trait history and runs are the product's
record and are never pruned (only `forget --purge` drops an orphan's history, on request).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, delete, func, select, update

from audience_sync.state import schema as t
from audience_sync.state.store import Store, insert_ignore
from audience_sync.states import DeliveryStatus, InitialState

# Deliveries looked at per prune transaction: a prune of millions of old rows must not hold
# SQLite's write lock (every run's and drain's) for minutes.
PRUNE_CHUNK = 50_000


def prune_deliveries(store: Store, older_than: datetime, chunk: int | None = None) -> int:
    """Delete sent deliveries acknowledged before `older_than`, and superseded ones observed
    before it; pending and failed ones are never touched. Returns how many went.

    The table is walked in id order, `chunk` rows (PRUNE_CHUNK) per transaction: each step
    reads one range of the primary key, so the whole walk reads every row once.
    """
    d = t.deliveries
    step = chunk or PRUNE_CHUNK
    removed = 0
    after = 0
    while True:
        with store.write() as conn:
            window = select(d.c.id).where(d.c.id > after).order_by(d.c.id).limit(step) \
                .subquery()
            upper = conn.execute(select(func.max(window.c.id))).scalar_one()
            if upper is None:
                return removed
            in_window = and_(d.c.id > after, d.c.id <= upper)
            # One status at a time: a literal status per statement (schema.status_is).
            removed += int(conn.execute(delete(d).where(
                in_window, t.status_is(DeliveryStatus.SENT),
                d.c.sent_at < older_than)).rowcount)
            removed += int(conn.execute(delete(d).where(
                in_window, t.status_is(DeliveryStatus.SUPERSEDED),
                d.c.observed_at < older_than)).rowcount)
        after = int(upper)


_NEVER = datetime(2000, 1, 1, tzinfo=UTC)


def claim_daily(store: Store, task: str, now: datetime,
                every: timedelta = timedelta(days=1)) -> bool:
    """True when `task` last ran at least `every` ago (or never), marking it as run now: one
    process wins the claim, so a chore runs once a day whatever the ticks and restarts."""
    h = t.housekeeping
    with store.write() as conn:
        # Never run: a row from long ago, which the update below then claims.
        conn.execute(insert_ignore(store.dialect, h).values(task=task, last_run_at=_NEVER))
        won = conn.execute(update(h).where(h.c.task == task,
                                           h.c.last_run_at <= now - every)
                           .values(last_run_at=now)).rowcount
    return bool(won)


@dataclass(frozen=True)
class Forgotten:
    members: int
    deliveries: int
    history: int  # history rows and runs dropped (--purge only)


def forget(store: Store, computation_id: int, at: datetime, *, purge: bool) -> Forgotten:
    """Drop one audience's current state (members, an account audience's fanned-out users,
    deliveries, lease, alert state); with
    `purge` also its history and runs, and the audience itself."""
    cid = computation_id
    with store.write() as conn:
        members = conn.execute(delete(t.members).where(t.members.c.computation_id == cid))
        conn.execute(delete(t.fanout_members).where(t.fanout_members.c.computation_id == cid))
        deliveries = conn.execute(delete(t.deliveries)
                                  .where(t.deliveries.c.computation_id == cid))
        conn.execute(delete(t.alert_state).where(t.alert_state.c.computation_id == cid))
        history = 0
        if purge:
            for table in (t.membership_history, t.trait_history, t.runs):
                history += conn.execute(delete(table).where(
                    table.c.computation_id == cid)).rowcount
            conn.execute(delete(t.computations).where(t.computations.c.id == cid))
        else:
            # Its open stays end now: nobody tracks it from here, and if its key is
            # configured again its initial run opens new ones.
            mh, th = t.membership_history, t.trait_history
            conn.execute(update(mh).where(mh.c.computation_id == cid, mh.c.exited_at.is_(None))
                         .values(exited_at=at))
            conn.execute(update(th).where(th.c.computation_id == cid, th.c.valid_to.is_(None))
                         .values(valid_to=at))
            # Kept for its history (runs refer to it); it starts over if configured again.
            conn.execute(update(t.computations).where(t.computations.c.id == cid).values(
                forgotten_at=at, member_count=0, initial_state=InitialState.PENDING,
                lease_owner=None, lease_expires_at=None, next_due_at=None,
                consecutive_failures=0, applied_columns=None, last_run_id=None))
    return Forgotten(int(members.rowcount), int(deliveries.rowcount), history)



