"""Everything a reader (CLI, daemon, dashboard, alerts) asks the state database, as frozen
objects: members now or at a time, the history of changes, runs, unsent deliveries, status.

Readers never see a connection or a statement. Long answers (members, history) are iterators
that hold one read transaction open while they are consumed: a million members never sit in
memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Row, and_, desc, distinct, literal, or_, select, union_all

from audience_sync.state import schema as t
from audience_sync.state.records import Progress, RunRecord, run_record_of, runs_query
from audience_sync.state.store import ComputationRow, Store
from audience_sync.states import DeliveryStatus

__all__ = ["AudienceMember", "ComputationRow", "HistoryEvent", "Progress", "RunRecord",
           "TraitValue", "UnsentDelivery", "audience_members", "computations", "delivery_counts",
           "history", "initial_progress", "keys_with_due_pending", "run_record", "runs",
           "trait_values", "unsent_deliveries"]


# -- runs ---------------------------------------------------------------------------------------

def run_record(store: Store, run_id: int) -> RunRecord | None:
    with store.read() as conn:
        row = conn.execute(runs_query().where(t.runs.c.id == run_id)).first()
    return run_record_of(row) if row is not None else None


def runs(store: Store, *, key: str | None = None, limit: int | None = 50) -> list[RunRecord]:
    """The most recent runs, newest first (of one audience or trait when key is given)."""
    query = runs_query().order_by(t.runs.c.id.desc()).limit(limit)
    if key is not None:
        query = query.where(t.computations.c.key == key)
    with store.read() as conn:
        return [run_record_of(row) for row in conn.execute(query)]


# -- status -------------------------------------------------------------------------------------

def computations(store: Store) -> list[ComputationRow]:
    """Every audience and trait the store tracks (not the ones `forget` dropped)."""
    return [row for row in store.computations() if row.forgotten_at is None]


def initial_progress(store: Store, computation_id: int, at: datetime) -> Progress | None:
    """An initial sync still delivering: started at, done of total, the rate over the last
    minutes, ETA (the dashboard's own figures: one query for both)."""
    from audience_sync.state import dashboard

    with store.read() as conn:
        counts = dashboard.unsent_counts(conn, computation_id)
        pending = {dest: n for (_cid, dest, st), n in counts.items()
                   if st == DeliveryStatus.PENDING}
        failed = sum(n for (_cid, _dest, st), n in counts.items()
                     if st == DeliveryStatus.FAILED)
        return dashboard.initial_progress(conn, computation_id, pending, failed, at)


def delivery_counts(store: Store) -> dict[tuple[int, str, DeliveryStatus], int]:
    """(computation id, destination, status) -> count, for pending and failed deliveries."""
    from audience_sync.state import dashboard

    with store.read() as conn:
        return {(cid, dest, DeliveryStatus(status)): n
                for (cid, dest, status), n in dashboard.unsent_counts(conn).items()}


def keys_with_due_pending(store: Store, now: datetime) -> set[str]:
    """Keys of the audiences and traits with a pending delivery due by now."""
    d, c = t.deliveries, t.computations
    query = (select(distinct(c.c.key)).join(d, d.c.computation_id == c.c.id)
             .where(t.status_is(DeliveryStatus.PENDING),
                    or_(d.c.next_attempt_at.is_(None), d.c.next_attempt_at <= now)))
    with store.read() as conn:
        return set(conn.execute(query).scalars())


# -- members ------------------------------------------------------------------------------------

class AudienceMember(NamedTuple):
    """A member; the contact traits only for members now (the history keeps ids only)."""

    user_id: str
    email: str | None = None
    name: str | None = None
    title: str | None = None
    company_id: str | None = None


class TraitValue(NamedTuple):
    user_id: str
    value: str | None  # canonical JSON


def audience_members(store: Store, computation_id: int,
                     at: datetime | None = None) -> Iterator[AudienceMember]:
    """Members now, or at a past time (from the history), by user id."""
    if at is None:
        m = t.members
        query = select(m.c.user_id, m.c.email, m.c.name, m.c.title, m.c.company_id) \
            .where(m.c.computation_id == computation_id).order_by(m.c.user_id)
    else:
        h = t.membership_history
        query = select(h.c.user_id).where(
            h.c.computation_id == computation_id, h.c.entered_at <= at,
            or_(h.c.exited_at.is_(None), h.c.exited_at > at)).order_by(h.c.user_id)
    with store.read() as conn:
        for row in conn.execute(query):
            yield AudienceMember(*row)


def trait_values(store: Store, computation_id: int,
                 at: datetime | None = None) -> Iterator[TraitValue]:
    """Each user's value now, or at a past time (from the history), by user id."""
    if at is None:
        m = t.members
        query = select(m.c.user_id, m.c.value).where(m.c.computation_id == computation_id) \
            .order_by(m.c.user_id)
    else:
        th = t.trait_history
        query = select(th.c.user_id, th.c.value).where(
            th.c.computation_id == computation_id, th.c.valid_from <= at,
            or_(th.c.valid_to.is_(None), th.c.valid_to > at)).order_by(th.c.user_id)
    with store.read() as conn:
        for row in conn.execute(query):
            yield TraitValue(*row)


# -- history ------------------------------------------------------------------------------------

class HistoryEvent(NamedTuple):
    user_id: str
    change: str  # entered | exited (audiences); set | exited (traits)
    at: datetime | None
    run_id: int
    value: str | None  # a trait's canonical JSON value when set


def history(store: Store, computation_id: int, kind: str, *, user: str | None = None,
            since: datetime | None = None) -> Iterator[HistoryEvent]:
    """Changes of an audience (entered / exited) or a trait (set / exited), oldest first: the
    union of both ends of each history interval."""
    if kind == "audience":
        h = t.membership_history
        base = [h.c.computation_id == computation_id] + ([h.c.user_id == user] if user else [])
        entered = select(h.c.user_id, literal("entered").label("change"),
                         h.c.entered_at.label("at"), h.c.entered_run.label("run_id"),
                         literal(None).label("value")).where(*base)
        exits = select(h.c.user_id, literal("exited").label("change"),
                       h.c.exited_at.label("at"), h.c.exited_run.label("run_id"),
                       literal(None).label("value")).where(*base, h.c.exited_at.is_not(None))
        if since is not None:
            entered = entered.where(h.c.entered_at >= since)
            exits = exits.where(h.c.exited_at >= since)
    else:
        th = t.trait_history
        nxt = t.trait_history.alias("nxt")
        base = [th.c.computation_id == computation_id] + ([th.c.user_id == user] if user
                                                           else [])
        entered = select(th.c.user_id, literal("set").label("change"),
                         th.c.valid_from.label("at"), th.c.valid_from_run.label("run_id"),
                         th.c.value).where(*base)
        superseded = select(nxt.c.id).where(and_(
            nxt.c.computation_id == th.c.computation_id, nxt.c.user_id == th.c.user_id,
            nxt.c.valid_from_run == th.c.valid_to_run))
        exits = select(th.c.user_id, literal("exited").label("change"),
                       th.c.valid_to.label("at"), th.c.valid_to_run.label("run_id"),
                       literal(None).label("value")).where(
            *base, th.c.valid_to.is_not(None), ~superseded.exists())
        if since is not None:
            entered = entered.where(th.c.valid_from >= since)
            exits = exits.where(th.c.valid_to >= since)
    events = union_all(entered, exits).subquery("events")
    query = select(events).order_by(events.c.at, events.c.run_id, events.c.user_id,
                                    desc(events.c.change))
    with store.read() as conn:
        # A union's column carries no type: convert its times as the UTCDateTime type would.
        utc = t.UTCDateTime()
        for row in conn.execute(query):
            yield HistoryEvent(row.user_id, row.change,
                               utc.process_result_value(row.at, conn.dialect), row.run_id,
                               row.value)


# -- deliveries ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnsentDelivery:
    id: int
    key: str
    destination: str
    user_id: str
    value: str  # canonical JSON
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    run_id: int
    observed_at: datetime


def unsent_deliveries(store: Store, *, failed_only: bool = False, key: str | None = None,
                      destination: str | None = None, limit: int = 100) -> list[UnsentDelivery]:
    """Pending and failed deliveries (or failed only), oldest first."""
    d, c = t.deliveries, t.computations
    rows: list[Row[Any]] = []
    statuses = ((DeliveryStatus.FAILED,) if failed_only
                else (DeliveryStatus.PENDING, DeliveryStatus.FAILED))
    with store.read() as conn:
        # One query per status, each along its partial index; merged oldest first.
        for status in statuses:
            query = (select(d.c.id, c.c.key, d.c.destination, d.c.user_id, d.c.value,
                            d.c.status, d.c.attempts, d.c.next_attempt_at, d.c.last_error,
                            d.c.run_id, d.c.observed_at)
                     .join(c, c.c.id == d.c.computation_id)
                     .where(t.status_is(status))
                     .with_hint(d, f"INDEXED BY {t.UNSENT_INDEX[status]}", "sqlite")
                     .order_by(d.c.id).limit(limit))
            if key is not None:
                query = query.where(c.c.key == key)
            if destination is not None:
                query = query.where(d.c.destination == destination)
            rows += conn.execute(query).all()
    rows = sorted(rows, key=lambda row: row.id)[:limit]
    return [UnsentDelivery(
        id=row.id, key=row.key, destination=row.destination, user_id=row.user_id,
        value=row.value, status=DeliveryStatus(row.status), attempts=row.attempts,
        next_attempt_at=row.next_attempt_at, last_error=row.last_error, run_id=row.run_id,
        observed_at=row.observed_at) for row in rows]
