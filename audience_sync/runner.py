"""One run of one audience or trait: snapshot -> diff -> guards -> one transaction.

The transaction writes the run record, the current members, the history intervals and one
outbox row per change and destination, or nothing at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    delete,
    insert,
    literal,
    select,
    text,
    true,
    union,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import schema as t
from audience_sync.cadence import next_due_after_failure, next_due_after_success
from audience_sync.clock import Clock, utcnow
from audience_sync.compiler import value_decoder
from audience_sync.config import Computation, Config
from audience_sync.errors import AudienceSyncError, LeaseLost, SourceError, StoreError
from audience_sync.snapshot import (
    SENT_COLUMNS,
    Diff,
    compute_diff,
    create_temp_tables,
    delta,
    drop_temp_tables,
    exited,
    insert_select,
    load_rows,
)
from audience_sync.sources import (
    SkipCounts,
    Snapshot,
    computation_statement,
    create_source_engine,
    describe_db_error,
)
from audience_sync.store import Store

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    key: str
    kind: str  # initial | incremental | resync
    status: str  # succeeded | failed | held | planned (dry run)
    run_id: int | None = None
    members: int = 0
    previous_members: int = 0
    entered: int = 0
    exited: int = 0
    changed: int = 0
    queued: int = 0
    skipped: SkipCounts = field(default_factory=SkipCounts)
    error: str | None = None
    sample_entered: list[str] = field(default_factory=list)
    sample_exited: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "planned")

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "kind": self.kind, "status": self.status, "run_id": self.run_id,
            "members": self.members, "previous_members": self.previous_members,
            "entered": self.entered, "exited": self.exited, "changed": self.changed,
            "queued": self.queued,
            "skipped": {"null": self.skipped.null, "empty": self.skipped.empty,
                        "too_long": self.skipped.too_long,
                        "duplicate": self.skipped.duplicate},
            "error": self.error, "sample_entered": self.sample_entered,
            "sample_exited": self.sample_exited, "seconds": round(self.seconds, 3),
        }


def run_computation(
    store: Store,
    config: Config,
    comp: Computation,
    *,
    resync: bool = False,
    force: bool = False,
    dry_run: bool = False,
    fencing_token: int | None = None,
    clock: Clock = utcnow,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Evaluate one audience or trait now and apply the changes in one transaction.

    Source errors and held runs are recorded (unless dry_run) and returned, not raised.
    :raises LeaseLost: the fencing token is no longer ours; nothing was committed.
    :raises StoreError: the state database failed; nothing was committed.
    """
    started = time.monotonic()
    now = clock()
    row = store.computation(comp.key)
    if row is None and not dry_run:
        raise StoreError(f"{comp.key}: not registered in the state database")
    # A dry run of an audience the store has never seen plans an initial run against nothing.
    cid = row.id if row else -1
    if row is None or row.initial_state == "pending":
        kind = "initial"
    else:
        kind = "resync" if resync else "incremental"
    result = RunResult(key=comp.key, kind=kind, status="planned",
                       previous_members=row.member_count if row else 0)
    # In the state database itself the rows go stage-ward in SQL, unless their values need
    # Python to become JSON (a unique_list is JSON text on SQLite).
    same_db = comp.source.url == config.state_db and value_decoder(comp.definition) is None
    log.info("%s: %s run started (loading snapshot from source %r)", comp.key, kind,
             comp.source_name)
    try:
        with store.engine.connect() as conn:
            try:
                columns = _stage(conn, comp, now, same_db, result, progress)
                ids_only = columns == ("user_id",)
                conn.execution_options(sqlite_immediate=True)
                with conn.begin() as tx:
                    diff = compute_diff(conn, cid, resync=kind == "resync",
                                        staged=result.members,
                                        previous=result.previous_members,
                                        skipped=result.skipped,
                                        compare_sent=not (ids_only and row is not None and
                                                          row.applied_columns == "user_id"))
                    # Distinct members now, whatever repeated ids the stage held.
                    result.members = result.previous_members - diff.exited + diff.entered
                    _fill(result, diff)
                    held = _hold_reason(comp, result, force)
                    if held or dry_run:
                        tx.rollback()
                        if held:
                            result.status = "held"
                            result.error = held
                    else:
                        _apply(conn, comp, cid, kind, now, result, force, fencing_token, clock,
                               columns)
                        result.status = "succeeded"
            finally:
                if not conn.closed and not conn.invalidated:
                    if conn.in_transaction():
                        conn.rollback()
                    drop_temp_tables(conn)
                    conn.commit()
        if result.status == "succeeded":
            _refresh_statistics(store, comp, result)
    except SourceError as exc:
        result.status = "failed"
        result.error = exc.message
    except (LeaseLost, AudienceSyncError):
        raise
    except SQLAlchemyError as exc:
        raise StoreError(f"{comp.key}: state database error: {describe_db_error(exc)}") from exc
    result.seconds = time.monotonic() - started
    log.info("%s: %s run %s: %d members, +%d -%d ~%d, %d queued, %d rows skipped, %.2fs%s",
             comp.key, kind, result.status, result.members, result.entered, result.exited,
             result.changed, result.queued, result.skipped.total, result.seconds,
             f" ({result.error})" if result.error else "")
    if result.status in ("failed", "held") and not dry_run:
        _record_unapplied(store, comp, cid, kind, now, result, fencing_token, clock)
    return result


def _stage(conn: Connection, comp: Computation, now: datetime, same_db: bool,
           result: RunResult, progress: Callable[[int], None] | None) -> tuple[str, ...] | None:
    """Load the snapshot into the stage; return the columns it holds (None: not known)."""
    with conn.begin():
        create_temp_tables(conn)
    skipped = result.skipped
    if same_db:
        with conn.begin():
            try:
                statement, params = computation_statement(comp, conn.engine, now)
                result.members = insert_select(conn, statement, params, comp.kind, skipped)
            except SQLAlchemyError as exc:
                raise SourceError(f"{comp.path} ({comp.key}): query on the state database "
                                  f"failed: {describe_db_error(exc)}") from exc
        return None
    source = create_source_engine(comp.source.url)
    try:
        snapshot = Snapshot(comp, source, now, skipped)
        with conn.begin():
            result.members = load_rows(conn, snapshot, progress)
        return snapshot.columns
    finally:
        source.dispose()


# A run that changed more than this fraction of the state refreshes the planner's statistics.
STATISTICS_CHANGE_FRACTION = 0.1


def _refresh_statistics(store: Store, comp: Computation, result: RunResult) -> None:
    """PostgreSQL plans the next diff well only if it knows how big the tables got.

    Autovacuum gets there eventually; a bulk initial run should not wait for it.
    """
    if store.dialect != "postgresql":
        return
    changes = result.entered + result.exited + result.changed
    if result.kind != "initial" and changes <= STATISTICS_CHANGE_FRACTION * max(
            result.previous_members, 1):
        return
    history = "membership_history" if comp.kind == "audience" else "trait_history"
    with store.engine.connect() as conn:
        conn.execute(text(f"ANALYZE members, {history}, deliveries"))
        conn.commit()


def _fill(result: RunResult, diff: Diff) -> None:
    result.entered = diff.entered
    result.exited = diff.exited
    result.changed = diff.changed
    result.sample_entered = diff.sample_entered
    result.sample_exited = diff.sample_exited
    sends = diff.entered + diff.changed + diff.exited + diff.unchanged_resent
    result.queued = sends


def _hold_reason(comp: Computation, result: RunResult, force: bool) -> str | None:
    if force or result.previous_members == 0:
        return None
    if result.members == 0:
        return (f"{comp.key}: the source returned no rows for an audience of "
                f"{result.previous_members} members; held (run with --force to apply)")
    fraction = result.exited / result.previous_members
    if fraction > comp.max_removal_fraction:
        return (f"{comp.key}: would remove {result.exited} of {result.previous_members} members "
                f"({fraction:.0%} > max_removal_fraction {comp.max_removal_fraction:.0%}); "
                "held (run with --force to apply)")
    return None


def _apply(conn: Connection, comp: Computation, cid: int, kind: str, now: datetime,
           result: RunResult, force: bool, fencing_token: int | None, clock: Clock,
           columns: tuple[str, ...] | None) -> None:
    m, h = t.members, t.membership_history
    run_id = int(conn.execute(insert(t.runs).values(
        computation_id=cid, kind=kind, status="succeeded", clock=now, started_at=now,
        forced=force, fencing_token=fencing_token or 0,
    ).returning(t.runs.c.id)).scalar_one())
    result.run_id = run_id
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
    # Outbox: a newer change supersedes a pending older one for the same user.
    d = t.deliveries
    pending = and_(d.c.computation_id == cid, t.status_is("pending"))
    if _any_pending(conn, cid):
        if conn.dialect.name == "postgresql" and kind != "resync":
            conn.execute(_SUPERSEDE_BY_PROBES, {"cid": cid})
        else:
            conn.execute(update(d).where(
                pending, d.c.user_id.in_(union(select(delta.c.user_id), gone)),
            ).values(status="superseded"))
    stay_value = literal("true") if comp.kind == "audience" else delta.c.value
    leave_value = literal("false") if comp.kind == "audience" else literal("null")
    outbox_columns = ["computation_id", "run_id", "destination", "user_id", "value",
                      *t.CONTACT_TRAITS, "observed_at", "status"]
    for destination in comp.destinations:
        for table, value in ((delta, stay_value), (exited, leave_value)):
            conn.execute(insert(d).from_select(outbox_columns, select(
                literal(cid), literal(run_id), literal(destination), table.c.user_id, value,
                *(table.c[n] for n in t.CONTACT_TRAITS), literal(now, t.UTCDateTime),
                literal("pending"))))
    result.queued *= len(comp.destinations)
    # The run record and the audience row; the fencing check makes a lost lease fatal.
    finished = clock()
    conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(
        finished_at=finished, members=result.members, entered=result.entered,
        exited=result.exited, changed=result.changed, queued=result.queued,
        **_skip_values(result.skipped)))
    values: dict[str, Any] = dict(
        member_count=result.members, last_run_id=run_id, last_run_at=now,
        applied_columns=",".join(columns) if columns else None,
        last_success_at=finished, consecutive_failures=0,
        next_due_at=next_due_after_success(comp.key, finished, comp.every, comp.jitter))
    if kind == "initial":
        values["initial_state"] = "delivering" if result.queued else "complete"
    _update_computation(conn, cid, fencing_token, values)


# PostgreSQL: the pending deliveries of the changed users, found by one index probe per
# changed user. Its planner prefers to hash the changed users and scan every pending delivery,
# which an initial sync still being delivered makes millions (5 s for 10M, where the probes
# take 0.2 s). OFFSET 0 keeps the probe a nested loop; ARRAY() keeps the update on the key.
_SUPERSEDE_BY_PROBES = text(
    "UPDATE deliveries SET status = 'superseded' WHERE status = 'pending' AND id = ANY(ARRAY("
    f"SELECT p.id FROM (SELECT user_id FROM {delta.name} UNION ALL SELECT user_id FROM "
    f"{exited.name})"
    " AS c CROSS JOIN LATERAL (SELECT d.id FROM deliveries AS d WHERE d.computation_id = :cid"
    " AND d.status = 'pending' AND d.user_id = c.user_id OFFSET 0) AS p))")


def _any_pending(conn: Connection, cid: int) -> bool:
    # Both planners must be steered to the partial index: SQLite has no statistics and picks a
    # wider index; PostgreSQL's may be stale (all pending after an initial run, all sent an hour
    # later) and then scans every delivery the audience ever had. The ORDER BY is the index's.
    hint = "INDEXED BY ix_deliveries_pending" if conn.dialect.name == "sqlite" else ""
    return conn.execute(text(
        f"SELECT 1 FROM deliveries {hint} WHERE computation_id = :cid AND status = 'pending' "
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
            "skipped_too_long": skipped.too_long, "skipped_duplicate": skipped.duplicate}


def _record_unapplied(store: Store, comp: Computation, cid: int, kind: str, now: datetime,
                      result: RunResult, fencing_token: int | None, clock: Clock) -> None:
    """A failed or held run leaves members, history and outbox as they were; only say so."""
    finished = clock()
    row = store.computation(comp.key)
    failures = (row.consecutive_failures if row else 0) + 1
    with store.write() as conn:
        result.run_id = int(conn.execute(insert(t.runs).values(
            computation_id=cid, kind=kind, status=result.status, clock=now, started_at=now,
            finished_at=finished, members=result.members, entered=result.entered,
            exited=result.exited, changed=result.changed, queued=0,
            fencing_token=fencing_token or 0, error=result.error,
            **_skip_values(result.skipped),
        ).returning(t.runs.c.id)).scalar_one())
        values: dict[str, Any] = dict(last_run_id=result.run_id, last_run_at=now)
        if result.status == "failed":
            values.update(consecutive_failures=failures,
                          next_due_at=next_due_after_failure(finished, failures, comp.every))
        else:
            # A held run waits for an operator; the daemon retries it at the normal cadence.
            values.update(next_due_at=next_due_after_success(comp.key, finished, comp.every,
                                                             comp.jitter))
        _update_computation(conn, cid, fencing_token, values)
