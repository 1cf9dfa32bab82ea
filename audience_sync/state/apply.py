"""The run transaction: stage a snapshot, diff it, and apply the changes or roll them back.

One connection per run (the stage and diff tables are temporary, per connection). Applying
writes the run record, the current members, the history intervals and one outbox row per
change and destination in one transaction, fenced by the lease's token. Every SQLAlchemyError
leaves this module as a StoreError (source errors on the same-database path as SourceError).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Text,
    and_,
    delete,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    union,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from audience_sync.cadence import next_due_after_failure, next_due_after_success
from audience_sync.clock import Clock
from audience_sync.config import Computation
from audience_sync.errors import LeaseLost, SourceError, StoreError, describe_db_error
from audience_sync.messages import CONTACT_TRAITS, GROUP
from audience_sync.sources import SkipCounts, SourceRows, computation_statement
from audience_sync.state import schema as t
from audience_sync.state.staging import (
    SENT_COLUMNS,
    Diff,
    FanDiff,
    compute_diff,
    compute_fan_diff,
    create_temp_tables,
    delta,
    drop_temp_tables,
    exited,
    fan_delta,
    fan_exited,
    insert_select,
    load_account_users,
    load_rows,
)
from audience_sync.state.store import Store
from audience_sync.states import DeliveryStatus, InitialState, RunKind, RunStatus


@dataclass(frozen=True)
class RunFigures:
    """What a run found, as its run record stores it."""

    status: RunStatus
    members: int
    entered: int
    exited: int
    changed: int
    queued: int
    skipped: SkipCounts
    error: str | None = None
    fan: FanDiff | None = None  # an account audience's fan-out


@contextlib.contextmanager
def _store_errors(label: str) -> Iterator[None]:
    try:
        yield
    except SQLAlchemyError as exc:
        raise StoreError(f"{label}: state database error: {describe_db_error(exc)}") from exc


class RunTransaction:
    """The write transaction of one run, holding the write lock (SQLite) from its start."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.rolled_back = False
        self.queued = 0

    def diff(self, cid: int, *, resync: bool, staged: int, previous: int, skipped: SkipCounts,
             compare_sent: bool, carry_sent: bool) -> Diff:
        return compute_diff(self._conn, cid, resync=resync, staged=staged, previous=previous,
                            skipped=skipped, compare_sent=compare_sent, carry_sent=carry_sent)

    def fan_diff(self, cid: int, *, resync: bool) -> FanDiff:
        """An account computation fanned out to users: the users' diff (after diff())."""
        return compute_fan_diff(self._conn, cid, resync)

    def rollback(self) -> None:
        self._conn.rollback()
        self.rolled_back = True

    def apply(self, comp: Computation, cid: int, kind: RunKind, now: datetime,
              figures: RunFigures, *, force: bool, fencing_token: int | None, clock: Clock,
              held_columns: str | None, fan: FanDiff | None = None) -> int:
        """Apply the diff (and an account computation's fan-out); the new run's id
        (`queued`: the outbox rows it wrote).

        :raises LeaseLost: the fencing token is no longer current; nothing is committed.
        """
        run_id, self.queued = _apply(self._conn, comp, cid, kind, now, figures, force,
                                     fencing_token, clock, held_columns, fan)
        return run_id


class RunSession:
    """One run's connection: the stage, then one transaction for diff and apply."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.fan_out = False  # it staged account users (and has the fan-out's tables)

    def stage_from_state_db(self, comp: Computation, now: datetime,
                            skipped: SkipCounts) -> int:
        """The source is the state database: fill the stage with one INSERT ... SELECT.

        :raises SourceError: the computation's query failed.
        """
        conn = self._conn
        with conn.begin():
            try:
                statement, params = computation_statement(comp, conn.engine, now)
                return insert_select(conn, statement, params, comp.kind, skipped, comp.level)
            except SQLAlchemyError as exc:
                raise SourceError(f"{comp.path} ({comp.key}): query on the state database "
                                  f"failed: {describe_db_error(exc)}") from exc

    def stage_rows(self, rows: SourceRows, progress: Callable[[int], None] | None) -> int:
        with self._conn.begin():
            return load_rows(self._conn, rows, progress)

    def stage_account_users(self, rows: Iterable[list[tuple[Any, ...]]]) -> int:
        """The source's account_users rows, for an account computation's fan-out."""
        self.fan_out = True
        with self._conn.begin():
            return load_account_users(self._conn, rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[RunTransaction]:
        conn = self._conn
        conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            tx = RunTransaction(conn)
            yield tx


@contextlib.contextmanager
def run_session(store: Store, label: str) -> Iterator[RunSession]:
    """A connection with the stage's temporary tables, dropped when the block ends.

    :raises StoreError: the state database failed (label starts the message).
    """
    with _store_errors(label), store.engine.connect() as conn:
        with conn.begin():
            create_temp_tables(conn)
        session = RunSession(conn)
        try:
            yield session
        finally:
            if not conn.closed and not conn.invalidated:
                if conn.in_transaction():
                    conn.rollback()
                drop_temp_tables(conn, fan_out=session.fan_out)
                conn.commit()


# A run that changed more than this fraction of the state refreshes the planner's statistics.
STATISTICS_CHANGE_FRACTION = 0.1


def refresh_statistics(store: Store, comp: Computation, kind: RunKind, result: RunFigures,
                       previous_members: int) -> None:
    """PostgreSQL plans the next diff well only if it knows how big the tables got.

    Autovacuum gets there eventually; a bulk initial run should not wait for it.
    """
    if store.dialect != "postgresql":
        return
    changes = result.entered + result.exited + result.changed
    if kind != RunKind.INITIAL and changes <= STATISTICS_CHANGE_FRACTION * max(
            previous_members, 1):
        return
    history = "membership_history" if comp.kind == "audience" else "trait_history"
    with _store_errors(comp.key), store.engine.connect() as conn:
        conn.execute(text(f"ANALYZE members, {history}, deliveries"))
        conn.commit()


def _apply(conn: Connection, comp: Computation, cid: int, kind: RunKind, now: datetime,
           result: RunFigures, force: bool, fencing_token: int | None, clock: Clock,
           held_columns: str | None, fan: FanDiff | None) -> tuple[int, int]:
    """Write the run: members, history, outbox, run record, audience row; its run id and the
    number of outbox rows it queued."""
    m, h = t.members, t.membership_history
    run_id = int(conn.execute(insert(t.runs).values(
        computation_id=cid, kind=kind, status=RunStatus.SUCCEEDED, clock=now, started_at=now,
        forced=force, fencing_token=fencing_token or 0,
    ).returning(t.runs.c.id)).scalar_one())
    gone = select(exited.c.user_id)
    new = delta.c.is_new == true()
    # Current members.
    conn.execute(delete(m).where(m.c.computation_id == cid, m.c.user_id.in_(gone)))
    if result.changed:
        conn.execute(update(m).where(
            m.c.computation_id == cid, m.c.user_id == delta.c.user_id,
            delta.c.is_changed == true(),
        ).values({name: delta.c[name] for name in SENT_COLUMNS}))
    conn.execute(insert(m).from_select(
        ["computation_id", "user_id", *SENT_COLUMNS, "entered_run"],
        select(literal(cid), delta.c.user_id, *(delta.c[n] for n in SENT_COLUMNS),
               literal(run_id)).where(new)))
    # History.
    if comp.kind == "audience":
        conn.execute(update(h).where(
            h.c.computation_id == cid, h.c.exited_at.is_(None), h.c.user_id.in_(gone),
        ).values(exited_at=now, exited_run=run_id))
        conn.execute(insert(h).from_select(
            ["computation_id", "user_id", "entered_at", "entered_run"],
            select(literal(cid), delta.c.user_id, literal(now, t.UTCDateTime),
                   literal(run_id)).where(new)))
    else:
        th = t.trait_history
        value_moved = select(delta.c.user_id).where(delta.c.value_changed == true())
        conn.execute(update(th).where(
            th.c.computation_id == cid, th.c.valid_to.is_(None),
            th.c.user_id.in_(union(gone, value_moved)),
        ).values(valid_to=now, valid_to_run=run_id))
        conn.execute(insert(th).from_select(
            ["computation_id", "user_id", "value", "valid_from", "valid_from_run"],
            select(literal(cid), delta.c.user_id, delta.c.value, literal(now, t.UTCDateTime),
                   literal(run_id)).where(new | (delta.c.value_changed == true()))))
    # Outbox: a newer change supersedes a pending older one for the same user, call by call:
    # only by a row of the same call this run writes. A track is an event: a resync's
    # unchanged member, or a trait's changed email alone, is sent an identify and no track,
    # and must leave a track still to send where it is. An account's rows and its users'
    # rows are told apart by their call too (their ids may coincide).
    d = t.deliveries
    pending = and_(d.c.computation_id == cid, t.status_is(DeliveryStatus.PENDING))
    account = comp.level == "account"
    # Whose track this run writes: entries, exits, new trait values.
    moved = new if comp.kind == "audience" else new | (delta.c.value_changed == true())
    tracks = any(call == "track" for _, call in comp.outbox_calls)
    if _any_pending(conn, cid):
        replaced: list[tuple[Any, Any]] = []  # (which pending rows, by whose new rows)
        if account:
            replaced.append((d.c.call == GROUP, union(select(delta.c.user_id), gone)))
            if fan is not None:
                fd = fan_delta.c
                replaced.append((d.c.call == "identify", union(
                    select(fd.user_id).where(fd.sends == true()),
                    select(fan_exited.c.user_id))))
                replaced.append((d.c.call == "track", union(
                    select(fd.user_id).where(or_(fd.is_new == true(),
                                                 fd.value_changed == true())),
                    select(fan_exited.c.user_id))))
        elif conn.dialect.name == "postgresql" and kind != RunKind.RESYNC and not (
                tracks and comp.kind == "trait"):
            # Every changed user gets every call anew (an audience's changes are entries).
            conn.execute(_SUPERSEDE_BY_PROBES, {"cid": cid})
        else:
            replaced.append((d.c.call != "track", union(select(delta.c.user_id), gone)))
            if tracks:
                replaced.append((d.c.call == "track",
                                 union(select(delta.c.user_id).where(moved), gone)))
        for calls, users in replaced:
            conn.execute(update(d).where(pending, calls, d.c.user_id.in_(users))
                         .values(status=DeliveryStatus.SUPERSEDED))
    stay_value = literal("true") if comp.kind == "audience" else delta.c.value
    leave_value = literal("false") if comp.kind == "audience" else literal("null")
    outbox_columns = ["computation_id", "run_id", "destination", "user_id", "value",
                      *CONTACT_TRAITS, "user_ref", "traits", "observed_at", "status", "call"]
    # A track call is an event: sent for an entry, an exit or a new trait value (`moved`),
    # never for a member whose contact traits alone changed (nor a resync's unchanged member).
    if account:
        per_call = (fan or FanDiff()).per_call(result.queued)
    else:
        per_call = {"identify": result.queued, "track": result.entered + result.exited}
        if comp.kind == "trait" and tracks:
            per_call["track"] += int(conn.execute(select(func.count()).select_from(delta).where(
                delta.c.is_new == false(), delta.c.value_changed == true())).scalar_one())
    observed = literal(now, t.UTCDateTime)
    queued = 0
    for destination, call in comp.outbox_calls:
        queued += per_call[call]
        head = (literal(cid), literal(run_id), literal(destination))
        tail = (observed, literal(DeliveryStatus.PENDING.value), literal(call))
        if account and call != GROUP:
            # The account's users: company_id is the account that puts them in.
            fan_stay = literal("true") if comp.kind == "audience" else fan_delta.c.value
            changed = fan_delta.c.sends == true() if call == "identify" else or_(
                fan_delta.c.is_new == true(), fan_delta.c.value_changed == true())
            for rows in (
                select(*head, fan_delta.c.user_id, fan_stay,
                       *_fan_traits(fan_delta.c.group_id), *tail).where(changed),
                select(*head, fan_exited.c.user_id, leave_value,
                       *_fan_traits(fan_exited.c.group_id), *tail),
            ):
                conn.execute(insert(d).from_select(outbox_columns, rows))
            continue
        for table, value in ((delta, stay_value), (exited, leave_value)):
            rows = select(*head, table.c.user_id, value,
                          *(table.c[n] for n in CONTACT_TRAITS), table.c.user_ref,
                          table.c.traits, *tail)
            if call == "track" and table is delta:
                rows = rows.where(moved)
            conn.execute(insert(d).from_select(outbox_columns, rows))
    if account:
        _apply_fan_out(conn, cid, run_id, fan)
    # The run record and the audience row; the fencing check makes a lost lease fatal.
    finished = clock()
    conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(
        finished_at=finished, members=result.members, entered=result.entered,
        exited=result.exited, changed=result.changed, queued=queued,
        **_skip_values(result.skipped), **_fan_values(result.fan)))
    values: dict[str, Any] = dict(
        member_count=result.members, last_run_id=run_id, last_run_at=now,
        applied_columns=held_columns,
        last_success_at=finished, consecutive_failures=0,
        next_due_at=next_due_after_success(comp.key, finished, comp.every, comp.jitter))
    if kind == RunKind.INITIAL:
        values["initial_state"] = (InitialState.DELIVERING if queued
                                   else InitialState.COMPLETE)
    _update_computation(conn, cid, fencing_token, values)
    return run_id, queued


def _fan_traits(group_id: Any) -> list[Any]:
    """A fanned-out user's contact traits, user_ref and traits: only company_id, their
    account."""
    return [group_id if name == "company_id" else literal(None, Text)
            for name in (*CONTACT_TRAITS, "user_ref", "traits")]


def _apply_fan_out(conn: Connection, cid: int, run_id: int, fan: FanDiff | None) -> None:
    """fanout_members becomes the users fanned out now (none when no destination takes the
    account computation user by user any more: a later fan-out starts afresh)."""
    fm = t.fanout_members
    if fan is None:
        conn.execute(delete(fm).where(fm.c.computation_id == cid))
        return
    conn.execute(delete(fm).where(fm.c.computation_id == cid,
                                  fm.c.user_id.in_(select(fan_exited.c.user_id))))
    staying = and_(fm.c.computation_id == cid, fm.c.user_id == fan_delta.c.user_id,
                   fan_delta.c.is_new == false())
    conn.execute(update(fm).where(staying).values(group_id=fan_delta.c.group_id,
                                                   value=fan_delta.c.value))
    conn.execute(insert(fm).from_select(
        ["computation_id", "user_id", "group_id", "value", "entered_run"],
        select(literal(cid), fan_delta.c.user_id, fan_delta.c.group_id, fan_delta.c.value,
               literal(run_id)).where(fan_delta.c.is_new == true())))


# PostgreSQL: the pending deliveries of the changed users, found by one index probe per
# changed user. Its planner prefers to hash the changed users and scan every pending delivery,
# which an initial sync still being delivered makes millions (5 s for 10M, where the probes
# take 0.2 s). OFFSET 0 keeps the probe a nested loop; ARRAY() keeps the update on the key.
# Neither step may match the partial indexes on pending rows: their statistics, taken when
# nothing was pending (everything sent, an hour after the last run), make the planner read
# the whole pending queue once per changed user or check every pending row against the
# whole array (2.8 s for 4,000 changed users of 200,000, 3.6 s for 20,000 of 1,000,000). So
# the probe names no status (it reads the user's few deliveries along (computation_id,
# user_id)), and the update's status test is written as coalesce(), which no partial index
# predicate matches: it looks the ids up by primary key and tests each row (0.5 s).
_SUPERSEDE_BY_PROBES = text(
    f"UPDATE deliveries SET status = '{DeliveryStatus.SUPERSEDED}' "
    f"WHERE coalesce(status, '') = '{DeliveryStatus.PENDING}' AND id = ANY(ARRAY("
    f"SELECT p.id FROM (SELECT user_id FROM {delta.name} UNION ALL SELECT user_id FROM "
    f"{exited.name})"
    " AS c CROSS JOIN LATERAL (SELECT d.id FROM deliveries AS d WHERE d.computation_id = :cid"
    " AND d.user_id = c.user_id OFFSET 0) AS p))")


def _any_pending(conn: Connection, cid: int) -> bool:
    # Both planners must be steered to the partial index: SQLite has no statistics and picks a
    # wider index; PostgreSQL's may be stale (all pending after an initial run, all sent an hour
    # later) and then scans every delivery the audience ever had. The ORDER BY is the index's.
    hint = "INDEXED BY ix_deliveries_pending" if conn.dialect.name == "sqlite" else ""
    return conn.execute(text(
        f"SELECT 1 FROM deliveries {hint} WHERE computation_id = :cid "
        f"AND status = '{DeliveryStatus.PENDING}' "
        "ORDER BY computation_id, user_id LIMIT 1"), {"cid": cid}).first() is not None


def _update_computation(conn: Connection, cid: int, fencing_token: int | None,
                        values: dict[str, Any]) -> None:
    c = t.computations
    condition = c.c.id == cid
    if fencing_token is not None:
        condition = and_(condition, c.c.fencing_token == fencing_token)
    if conn.execute(update(c).where(condition).values(values)).rowcount != 1:
        raise LeaseLost(f"computation {cid}: the lease was lost (fencing token "
                        f"{fencing_token} is no longer current); the run did not commit")


def _skip_values(skipped: SkipCounts) -> dict[str, int]:
    return {"skipped_null": skipped.null, "skipped_empty": skipped.empty,
            "skipped_too_long": skipped.too_long, "skipped_duplicate": skipped.duplicate,
            "skipped_bad_type": skipped.bad_type, "skipped_non_finite": skipped.non_finite}


def _fan_values(fan: FanDiff | None) -> dict[str, int | None]:
    if fan is None:
        return {"fan_users": None, "fan_entered": None, "fan_exited": None,
                "fan_changed": None}
    return {"fan_users": fan.users, "fan_entered": fan.entered, "fan_exited": fan.exited,
            "fan_changed": fan.changed}


def record_unapplied(store: Store, comp: Computation, cid: int, kind: RunKind, now: datetime,
                     result: RunFigures, fencing_token: int | None, clock: Clock) -> int:
    """A failed or held run leaves members, history and outbox as they were; only say so."""
    finished = clock()
    row = store.computation(comp.key)
    failures = (row.consecutive_failures if row else 0) + 1
    with _store_errors(comp.key), store.write() as conn:
        run_id = int(conn.execute(insert(t.runs).values(
            computation_id=cid, kind=kind, status=result.status, clock=now, started_at=now,
            finished_at=finished, members=result.members, entered=result.entered,
            exited=result.exited, changed=result.changed, queued=0,
            fencing_token=fencing_token or 0, error=result.error,
            **_skip_values(result.skipped), **_fan_values(result.fan),
        ).returning(t.runs.c.id)).scalar_one())
        values: dict[str, Any] = dict(last_run_id=run_id, last_run_at=now)
        if result.status == RunStatus.FAILED:
            values.update(consecutive_failures=failures,
                          next_due_at=next_due_after_failure(finished, failures, comp.every))
        else:
            # A held run waits for an operator; the daemon retries it at the normal cadence.
            values.update(next_due_at=next_due_after_success(comp.key, finished, comp.every,
                                                             comp.jitter))
        _update_computation(conn, cid, fencing_token, values)
    return run_id
