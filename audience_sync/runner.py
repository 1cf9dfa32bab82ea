"""One run of one audience or trait: snapshot -> diff -> guards -> one transaction.

The transaction (state/apply.py) writes the run record, the current members, the history
intervals and one outbox row per change and destination, or nothing at all. This module
decides: the run's kind, the removal guard, dry runs; it holds no SQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from audience_sync.clock import Clock, utcnow
from audience_sync.compiler import value_decoder
from audience_sync.config import Computation, Config
from audience_sync.errors import SourceError, StoreError
from audience_sync.sources import AccountUsers, SkipCounts, SourceRows, create_source_engine
from audience_sync.state.apply import (
    RunFigures,
    RunSession,
    record_unapplied,
    refresh_statistics,
    run_session,
)
from audience_sync.state.staging import Diff, FanDiff
from audience_sync.state.store import Store
from audience_sync.states import InitialState, RunKind, RunStatus

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    key: str
    kind: RunKind
    status: RunStatus
    run_id: int | None = None
    members: int = 0
    previous_members: int = 0
    entered: int = 0
    exited: int = 0
    changed: int = 0
    queued: int = 0
    # What this run sends (or, dry, what a forced run would send) to each destination.
    per_destination: dict[str, int] = field(default_factory=dict)
    skipped: SkipCounts = field(default_factory=SkipCounts)
    error: str | None = None
    sample_entered: list[str] = field(default_factory=list)
    sample_exited: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # An account computation fanned out to users: the users' changes.
    fan: FanDiff | None = None
    level: str = "user"  # account: members, entered and exited count accounts

    @property
    def ok(self) -> bool:
        return self.status in (RunStatus.SUCCEEDED, RunStatus.PLANNED)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "kind": self.kind, "level": self.level, "status": self.status,
            "run_id": self.run_id,
            "members": self.members, "previous_members": self.previous_members,
            "entered": self.entered, "exited": self.exited, "changed": self.changed,
            "queued": self.queued, "per_destination": self.per_destination,
            "skipped": self.skipped.as_dict(),
            "error": self.error, "sample_entered": self.sample_entered,
            "sample_exited": self.sample_exited, "seconds": round(self.seconds, 3),
            "fan_out": None if self.fan is None else self.fan.as_dict(),
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
    row = store.computation(comp.key)
    now = _not_before_last_run(comp.key, clock(), row.last_run_at if row else None)
    if row is None and not dry_run:
        raise StoreError(f"{comp.key}: not registered in the state database")
    # A dry run of an audience the store has never seen plans an initial run against nothing.
    cid = row.id if row else -1
    if row is None or row.initial_state == InitialState.PENDING:
        kind = RunKind.INITIAL
    else:
        kind = RunKind.RESYNC if resync else RunKind.INCREMENTAL
    result = RunResult(key=comp.key, kind=kind, status=RunStatus.PLANNED,
                       previous_members=row.member_count if row else 0, level=comp.level)
    # In the state database itself the rows go stage-ward in SQL, unless their values need
    # Python to become JSON (a unique_list is JSON text on SQLite).
    same_db = comp.source.url == config.state_db and value_decoder(comp.definition) is None
    log.info("%s: %s run started (loading snapshot from source %r)", comp.key, kind,
             comp.source_name)
    phase = _phases(comp.key)
    try:
        with run_session(store, comp.key) as session:
            columns = _stage(session, comp, now, same_db, result, progress)
            loaded = time.monotonic() - started
            phase(f"snapshot loaded: {result.members:,} rows"
                  + (f", {result.members / loaded:,.0f} rows/s" if loaded > 0 else "")
                  + "; computing the diff")
            members_ids_only = row is not None and row.applied_columns == IDS_ONLY
            if comp.kind == "audience":
                # Only membership changes cause an audience's calls; contact traits
                # travel with them (a changed email alone re-sends nobody).
                compare, carry = False, not members_ids_only
            else:
                compare = carry = not (columns == (IDS_ONLY,) and members_ids_only)
            with session.transaction() as tx:
                diff = tx.diff(cid, resync=kind == RunKind.RESYNC, staged=result.members,
                               previous=result.previous_members, skipped=result.skipped,
                               compare_sent=compare, carry_sent=carry)
                # Distinct members now, whatever repeated ids the stage held.
                result.members = result.previous_members - diff.exited + diff.entered
                _fill(result, diff)
                if comp.fanned_out:
                    result.fan = tx.fan_diff(cid, resync=kind == RunKind.RESYNC)
                held = _hold_reason(comp, result, force)
                sends = result.queued
                # A dry run tells what a forced run would send, to each destination: an
                # identify per change, a track per entry, exit or new trait value.
                if comp.level == "account":
                    per_call = (result.fan or FanDiff()).per_call(sends)
                else:
                    per_call = {"identify": sends, "track": result.entered + result.exited + (
                        result.changed if comp.kind == "trait" else 0)}
                result.per_destination = {name: 0 for name in comp.destinations}
                for name, call in comp.outbox_calls:
                    result.per_destination[name] += per_call[call]
                result.queued = sum(result.per_destination.values())
                if held or dry_run:
                    tx.rollback()
                    if held:
                        result.status = RunStatus.HELD
                        result.error = held
                    if held and not dry_run:
                        # As its run record says: nothing was queued.
                        result.queued = 0
                        result.per_destination = {}
                else:
                    phase(f"diff: +{result.entered:,} -{result.exited:,} ~{result.changed:,}; "
                          f"applying ({result.queued:,} deliveries to queue)")
                    # apply counts the rows per destination from the changes themselves.
                    result.run_id = tx.apply(
                        comp, cid, kind, now, replace(_figures(result), queued=sends),
                        force=force,
                        fencing_token=fencing_token, clock=clock,
                        held_columns=_held_columns(kind, columns, row.applied_columns if row
                                                   else None),
                        fan=result.fan)
                    # Counted as written: a track row only for an entry, exit or new value.
                    result.queued = tx.queued
                    result.status = RunStatus.SUCCEEDED
            if result.status == RunStatus.SUCCEEDED:
                phase(f"applied: run #{result.run_id} committed")
        if result.status == RunStatus.SUCCEEDED:
            refresh_statistics(store, comp, kind, _figures(result), result.previous_members)
    except SourceError as exc:
        result.status = RunStatus.FAILED
        result.error = exc.message
        # Nothing changed: the audience still has the members it had before this run.
        result.members = result.previous_members
        result.entered = result.exited = result.changed = result.queued = 0
        result.per_destination = {}
    result.seconds = time.monotonic() - started
    # The outcome line: what the CLI prints as its summary too (`summary`: it drops this
    # line when its stdout and stderr are one stream).
    log.log(_LEVELS.get(result.status, logging.INFO),
            "%s: %s run %s: %d %s, +%d -%d ~%d, %d queued, %d rows skipped, %.2fs%s",
            comp.key, kind, result.status, result.members,
            "accounts" if comp.level == "account" else "members", result.entered, result.exited,
            result.changed, result.queued, result.skipped.total, result.seconds,
            f" ({result.error})" if result.error else "", extra={"summary": True})
    if result.status in (RunStatus.FAILED, RunStatus.HELD) and not dry_run:
        result.run_id = record_unapplied(store, comp, cid, kind, now, _figures(result),
                                         fencing_token, clock)
    return result


_LEVELS = {RunStatus.FAILED: logging.ERROR, RunStatus.HELD: logging.WARNING}


def _phases(key: str) -> Callable[[str], None]:
    """Logs each phase of a run as it begins, with the seconds the previous one took."""
    last = [time.monotonic()]

    def phase(what: str) -> None:
        now = time.monotonic()
        log.info("%s: %s (%.1fs)", key, what, now - last[0])
        last[0] = now
    return phase


def _not_before_last_run(key: str, now: datetime, last_run_at: datetime | None) -> datetime:
    """A clock stepped back must not record times before the last run's: history intervals
    would end before they began and identify timestamps would go backwards."""
    if last_run_at is None or now >= last_run_at:
        return now
    log.warning("%s: the clock went back by %s since the last run; this run is recorded at the "
                "last run's time, %s", key, last_run_at - now, last_run_at.isoformat())
    return last_run_at


IDS_ONLY = "user_id"


def _held_columns(kind: str, columns: tuple[str, ...] | None,
                  previous: str | None) -> str | None:
    """What the members may hold after this run (`applied_columns`), None when not known.

    An audience's unchanged members keep the contact traits they were last sent with, so an
    ids-only query says the members hold ids only after a run that rewrote them all (initial,
    resync), or when they already did.
    """
    if columns is None:
        return None
    if columns == (IDS_ONLY,) and kind == RunKind.INCREMENTAL and previous != IDS_ONLY:
        return previous
    return ",".join(columns)


def _stage(session: RunSession, comp: Computation, now: datetime, same_db: bool,
           result: RunResult, progress: Callable[[int], None] | None) -> tuple[str, ...] | None:
    """Load the snapshot into the stage; return the columns it holds (None: not known)."""
    if same_db and not comp.fanned_out:
        result.members = session.stage_from_state_db(comp, now, result.skipped)
        return None
    source = create_source_engine(comp.source.url)
    try:
        if comp.fanned_out:
            users = AccountUsers(comp, source, now)
            staged = session.stage_account_users(users)
            log.info("%s: %d account users loaded from source %r%s", comp.key, staged,
                     comp.source_name, f" ({users.skipped} rows without a valid user or "
                     "account id skipped)" if users.skipped else "")
        if same_db:
            result.members = session.stage_from_state_db(comp, now, result.skipped)
            return None
        rows = SourceRows(comp, source, now, result.skipped)
        result.members = session.stage_rows(rows, progress)
        return rows.columns
    finally:
        source.dispose()


def _figures(result: RunResult) -> RunFigures:
    return RunFigures(status=result.status, members=result.members, entered=result.entered,
                      exited=result.exited, changed=result.changed, queued=result.queued,
                      skipped=result.skipped, error=result.error, fan=result.fan)


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
    held = _removes_too_many(comp, result.exited, result.previous_members,
                             f"{result.previous_members} members")
    fan = result.fan
    if held is None and fan is not None and fan.previous:
        # An emptied or broken account_users query must not send every user `false`.
        held = _removes_too_many(comp, fan.exited, fan.previous,
                                 f"the {fan.previous} users its accounts were fanned out to")
    return held


def _removes_too_many(comp: Computation, removed: int, previous: int,
                      of: str) -> str | None:
    """Why a run is held, when it would remove more than max_removal_fraction of `previous`."""
    fraction = removed / previous
    if fraction <= comp.max_removal_fraction:
        return None
    return (f"{comp.key}: would remove {removed} of {of} ({fraction:.0%} > "
            f"max_removal_fraction {comp.max_removal_fraction:.0%}); held (run with --force "
            "to apply)")
