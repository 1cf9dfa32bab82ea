"""The dashboard's reads: every figure aggregated in SQL, every table paged.

An audience page must render in well under a second for 10,000 runs and 10,000,000 members, so
nothing here reads members or sent deliveries row by row: member counts come from the run and
computation rows, the charts from the runs index (computation_id, id), the unsent deliveries
from their partial indexes, one user's rows from the (computation_id, user_id) indexes.
Each function takes the connection of one read transaction, so a page is one consistent view.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, func, select, text

from audience_sync.state import schema as t
from audience_sync.state.records import Progress, RunRecord, run_record_of, runs_query
from audience_sync.states import DeliveryStatus, InitialState, RunKind, RunStatus

PENDING, FAILED, SENT = DeliveryStatus.PENDING, DeliveryStatus.FAILED, DeliveryStatus.SENT

# The sparkline on `/`: members after each of the last N succeeded runs.
SPARKLINE_RUNS = 30
# The charts on an audience page: the last N runs (one point each); older ones are in the table.
CHART_RUNS = 500
RUNS_PAGE = 50
RECENT_FAILED = 20
USER_ROWS = 200
# The initial-sync rate is read from the deliveries acknowledged in this window, sampled from
# the newest ones below the queue's head (sent_at has no index: a bounded sample, not a scan).
RATE_WINDOW = timedelta(minutes=5)
RATE_SAMPLE = 5_000


@dataclass(frozen=True)
class AudienceSummary:
    id: int
    key: str
    name: str
    kind: str
    members: int
    initial_state: str
    next_due_at: datetime | None
    last_success_at: datetime | None
    consecutive_failures: int
    lease_owner: str | None
    last_run: RunRecord | None
    sparkline: tuple[int, ...]  # oldest first
    pending: dict[str, int] = field(default_factory=dict)  # per destination
    failed: dict[str, int] = field(default_factory=dict)
    progress: Progress | None = None
    level: str = "user"  # account: its members are accounts

    @property
    def members_label(self) -> str:
        return "accounts" if self.level == "account" else "members"


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    destination: str
    user_id: str
    value: Any
    status: str
    attempts: int
    last_error: str | None
    run_id: int
    observed_at: datetime
    sent_at: datetime | None
    next_attempt_at: datetime | None


@dataclass(frozen=True)
class AudienceDetail:
    summary: AudienceSummary
    series: tuple[RunRecord, ...]  # the last CHART_RUNS runs, oldest first
    runs: tuple[RunRecord, ...]  # one page, newest first
    older_than: int | None  # the run id to page on from, when older runs exist
    queued_total: int  # deliveries queued by every run (sent ones are pruned in time)
    recent_failed: tuple[DeliveryRow, ...]


@dataclass(frozen=True)
class Stay:
    entered_at: datetime
    entered_run: int
    exited_at: datetime | None
    exited_run: int | None


@dataclass(frozen=True)
class TraitPeriod:
    value: Any
    valid_from: datetime
    valid_from_run: int
    valid_to: datetime | None
    valid_to_run: int | None


@dataclass(frozen=True)
class Member:
    email: str | None
    name: str | None
    title: str | None
    company_id: str | None
    value: Any


@dataclass(frozen=True)
class UserTimeline:
    user_id: str
    current: Member | None
    stays: tuple[Stay, ...]
    values: tuple[TraitPeriod, ...]
    deliveries: tuple[DeliveryRow, ...]  # newest first


_COMPUTATION_COLUMNS = (t.computations.c.id, t.computations.c.key, t.computations.c.name,
                        t.computations.c.kind, t.computations.c.member_count,
                        t.computations.c.initial_state, t.computations.c.next_due_at,
                        t.computations.c.last_success_at, t.computations.c.consecutive_failures,
                        t.computations.c.lease_owner, t.computations.c.last_run_id,
                        t.computations.c.level)
_DELIVERY_COLUMNS = (t.deliveries.c.id, t.deliveries.c.destination, t.deliveries.c.user_id,
                     t.deliveries.c.value, t.deliveries.c.status, t.deliveries.c.attempts,
                     t.deliveries.c.last_error, t.deliveries.c.run_id, t.deliveries.c.observed_at,
                     t.deliveries.c.sent_at, t.deliveries.c.next_attempt_at)


def _delivery(row: Row[Any]) -> DeliveryRow:
    values = row._asdict()
    values["value"] = json.loads(values["value"])
    return DeliveryRow(**values)


def _indexed(conn: Connection, index: str) -> str:
    """`INDEXED BY index` on SQLite, nothing elsewhere. Spelled out in the SQL text: SQLAlchemy
    renders no table hint for SQLite. Without it SQLite, given an audience, walks its every
    delivery by the (computation_id, user_id) index, or the whole table, rather than the few
    unsent ones along their partial index (150 ms for a 1M-member audience, not 1 ms)."""
    return f"INDEXED BY {index}" if conn.dialect.name == "sqlite" else ""


def unsent_counts(conn: Connection,
                   computation_id: int | None = None) -> dict[tuple[int, str, str], int]:
    """(computation id, destination, status) -> count of pending and failed deliveries, one
    query per status along its partial index (a status IN (...) uses neither)."""
    out: dict[tuple[int, str, str], int] = {}
    for status in (DeliveryStatus.PENDING, DeliveryStatus.FAILED):
        index = "ix_deliveries_pending" if status == PENDING and computation_id is not None \
            else t.UNSENT_INDEX[status]
        where = "" if computation_id is None else "AND computation_id = :cid"
        query = text(f"SELECT computation_id, destination, count(*) FROM deliveries "
                     f"{_indexed(conn, index)} WHERE status = '{status}' {where} "
                     "GROUP BY computation_id, destination")
        for cid, destination, count in conn.execute(query, {"cid": computation_id}):
            out[(cid, destination, status)] = int(count)
    return out


def _sparkline(conn: Connection, computation_id: int) -> tuple[int, ...]:
    query = (select(t.runs.c.members).where(t.runs.c.computation_id == computation_id,
                                          t.runs.c.status == RunStatus.SUCCEEDED)
             .order_by(t.runs.c.id.desc()).limit(SPARKLINE_RUNS))
    return tuple(reversed([int(n) for n in conn.execute(query).scalars()]))


def _run_row(conn: Connection, run_id: int | None) -> RunRecord | None:
    if run_id is None:
        return None
    row = conn.execute(runs_query().where(t.runs.c.id == run_id)).first()
    return run_record_of(row) if row else None


def _initial_run_id(conn: Connection, computation_id: int) -> int | None:
    query = (select(t.runs.c.id).where(t.runs.c.computation_id == computation_id,
                                     t.runs.c.kind == RunKind.INITIAL,
                                     t.runs.c.status == RunStatus.SUCCEEDED)
             .order_by(t.runs.c.id.desc()).limit(1))
    return conn.execute(query).scalar()


def initial_progress(conn: Connection, computation_id: int, pending: dict[str, int], failed: int,
              at: datetime) -> Progress | None:
    """Deliveries of the initial run: how many are no longer waiting, and at what rate."""
    run_id = _initial_run_id(conn, computation_id)
    if run_id is None:
        return None
    waiting = sum(pending.values())
    queued, started_at = conn.execute(select(t.runs.c.queued, t.runs.c.started_at)
                                      .where(t.runs.c.id == run_id)).one()
    total = int(queued)
    d = t.deliveries
    # The drain sends each destination's queue in id order: the newest acknowledged rows lie
    # just below the head of the queue (one index seek per destination), or below the run's
    # last row once nothing waits.
    head = text(f"SELECT min(id) FROM deliveries {_indexed(conn, t.UNSENT_INDEX[PENDING])} "
                f"WHERE status = '{DeliveryStatus.PENDING}' AND destination = :destination")
    heads = [conn.execute(head, {"destination": destination}).scalar()
             for destination in pending]
    last = conn.execute(select(func.max(d.c.id)).where(d.c.run_id == run_id)).scalar()
    candidates = [h for h in heads if h is not None] + ([last + 1] if last is not None else [])
    rate: float | None = None
    if candidates:
        sample = (select(d.c.computation_id, d.c.status, d.c.sent_at)
                  .where(d.c.id < min(candidates)).order_by(d.c.id.desc()).limit(RATE_SAMPLE)
                  .subquery())
        count, first = conn.execute(
            select(func.count(), func.min(sample.c.sent_at))
            .where(sample.c.computation_id == computation_id, sample.c.status == SENT,
                   sample.c.sent_at >= at - RATE_WINDOW)).one()
        if count and first is not None:
            rate = count / max((at - first).total_seconds(), 1.0)
    return Progress(run_id=run_id, total=total, done=max(0, total - waiting - failed),
                    pending=waiting, failed=failed, rate=rate,
                    eta_seconds=waiting / rate if rate and waiting else None,
                    started_at=started_at)


def _summary(conn: Connection, row: Row[Any], counts: dict[tuple[int, str, str], int],
             at: datetime) -> AudienceSummary:
    pending = {dest: n for (cid, dest, st), n in counts.items()
               if cid == row.id and st == DeliveryStatus.PENDING}
    failed = {dest: n for (cid, dest, st), n in counts.items()
              if cid == row.id and st == DeliveryStatus.FAILED}
    progress = None
    if row.initial_state == InitialState.DELIVERING:
        progress = initial_progress(conn, row.id, pending, sum(failed.values()), at)
    return AudienceSummary(
        id=row.id, key=row.key, name=row.name, kind=row.kind, members=row.member_count,
        initial_state=row.initial_state, next_due_at=row.next_due_at,
        last_success_at=row.last_success_at, consecutive_failures=row.consecutive_failures,
        lease_owner=row.lease_owner, last_run=_run_row(conn, row.last_run_id),
        sparkline=_sparkline(conn, row.id), pending=pending, failed=failed, progress=progress,
        level=row.level)


def overview(conn: Connection, at: datetime) -> list[AudienceSummary]:
    """Every audience and trait the store knows, in the order they were registered."""
    counts = unsent_counts(conn)
    # Not the orphans `forget` dropped (their history stays, their page with it).
    rows = conn.execute(select(*_COMPUTATION_COLUMNS)
                        .where(t.computations.c.forgotten_at.is_(None))
                        .order_by(t.computations.c.id)).all()
    return [_summary(conn, row, counts, at) for row in rows]


def audience(conn: Connection, key: str, at: datetime, *,
             older_than: int | None = None) -> AudienceDetail | None:
    """One audience's page; `older_than` pages the runs table by run id (newest first)."""
    row = conn.execute(select(*_COMPUTATION_COLUMNS).where(t.computations.c.key == key)).first()
    if row is None:
        return None
    summary = _summary(conn, row, unsent_counts(conn, row.id), at)
    newest = (runs_query().where(t.runs.c.computation_id == row.id)
              .order_by(t.runs.c.id.desc()))
    series = tuple(reversed([run_record_of(r) for r in conn.execute(newest.limit(CHART_RUNS))]))
    page_query = newest if older_than is None else newest.where(t.runs.c.id < older_than)
    page = [run_record_of(r) for r in conn.execute(page_query.limit(RUNS_PAGE + 1))]
    more = len(page) > RUNS_PAGE
    page = page[:RUNS_PAGE]
    queued = conn.execute(select(func.coalesce(func.sum(t.runs.c.queued), 0))
                          .where(t.runs.c.computation_id == row.id)).scalar_one()
    columns = ", ".join(c.name for c in _DELIVERY_COLUMNS)
    failed = text(f"SELECT {columns} FROM deliveries {_indexed(conn, t.UNSENT_INDEX[FAILED])}"
                  f" WHERE status = '{FAILED}' AND computation_id = :cid ORDER BY id DESC "
                  f"LIMIT {RECENT_FAILED}").columns(*_DELIVERY_COLUMNS)
    return AudienceDetail(
        summary=summary, series=series, runs=tuple(page),
        older_than=page[-1].id if more and page else None, queued_total=int(queued),
        recent_failed=tuple(_delivery(r) for r in conn.execute(failed, {"cid": row.id})))


@dataclass(frozen=True)
class ComputationRef:
    id: int
    key: str
    name: str
    kind: str


def find(conn: Connection, key: str) -> ComputationRef | None:
    c = t.computations
    row = conn.execute(select(c.c.id, c.c.key, c.c.name, c.c.kind).where(c.c.key == key)).first()
    return ComputationRef(**row._asdict()) if row else None


def user_timeline(conn: Connection, computation_id: int, user_id: str) -> UserTimeline | None:
    """One user in one audience or trait: stays (or values), and their deliveries; None when
    the store never saw this user there."""
    m, h, th, d = t.members, t.membership_history, t.trait_history, t.deliveries
    current_row = conn.execute(
        select(m.c.email, m.c.name, m.c.title, m.c.company_id, m.c.value)
        .where(m.c.computation_id == computation_id, m.c.user_id == user_id)).first()
    current = None
    if current_row is not None:
        values = current_row._asdict()
        values["value"] = json.loads(values["value"]) if values["value"] is not None else None
        current = Member(**values)
    stays = tuple(Stay(**r._asdict()) for r in conn.execute(
        select(h.c.entered_at, h.c.entered_run, h.c.exited_at, h.c.exited_run)
        .where(h.c.computation_id == computation_id, h.c.user_id == user_id)
        .order_by(h.c.entered_at, h.c.id).limit(USER_ROWS)))
    periods = tuple(TraitPeriod(
        value=json.loads(r.value) if r.value is not None else None, valid_from=r.valid_from,
        valid_from_run=r.valid_from_run, valid_to=r.valid_to, valid_to_run=r.valid_to_run)
        for r in conn.execute(
            select(th.c.value, th.c.valid_from, th.c.valid_from_run, th.c.valid_to,
                   th.c.valid_to_run)
            .where(th.c.computation_id == computation_id, th.c.user_id == user_id)
            .order_by(th.c.valid_from, th.c.id).limit(USER_ROWS)))
    sent = tuple(_delivery(r) for r in conn.execute(
        select(*_DELIVERY_COLUMNS)
        .where(d.c.computation_id == computation_id, d.c.user_id == user_id)
        .order_by(d.c.id.desc()).limit(USER_ROWS)))
    if current is None and not stays and not periods and not sent:
        return None
    return UserTimeline(user_id=user_id, current=current, stays=stays, values=periods,
                        deliveries=sent)
