"""The state store's read objects shared by every reader: a run's record and an initial
sync's progress, each with the one JSON shape the CLI, the dashboard and its API print."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, select

from audience_sync.clock import iso
from audience_sync.state import schema as t
from audience_sync.states import RunKind, RunStatus


@dataclass(frozen=True)
class RunRecord:
    id: int
    key: str
    kind: RunKind
    status: RunStatus
    clock: datetime
    finished_at: datetime | None
    members: int
    entered: int
    exited: int
    changed: int
    queued: int
    forced: bool
    skipped_null: int
    skipped_empty: int
    skipped_too_long: int
    skipped_duplicate: int
    error: str | None
    skipped_bad_type: int = 0
    skipped_non_finite: int = 0
    fencing_token: int = 0  # the lease grant it ran under (0: none)
    started_at: datetime | None = None
    # An account audience fanned out to users: users after the run, entered, exited, changed.
    fan_users: int | None = None
    fan_entered: int | None = None
    fan_exited: int | None = None
    fan_changed: int | None = None

    @property
    def fan_out(self) -> dict[str, int] | None:
        if self.fan_users is None:
            return None
        return {"users": self.fan_users, "entered": self.fan_entered or 0,
                "exited": self.fan_exited or 0, "changed": self.fan_changed or 0}

    @property
    def skipped(self) -> dict[str, int]:
        """Rows the run dropped, by reason."""
        return {"null": self.skipped_null, "empty": self.skipped_empty,
                "too_long": self.skipped_too_long, "duplicate": self.skipped_duplicate,
                "bad_type": self.skipped_bad_type, "non_finite": self.skipped_non_finite}

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def seconds(self) -> float | None:
        if self.finished_at is None or self.started_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def as_dict(self) -> dict[str, Any]:
        """The one JSON shape of a run record (runs, status and sync print it)."""
        return {
            "run_id": self.id, "key": self.key, "kind": self.kind, "status": self.status,
            "clock": iso(self.clock), "finished_at": iso(self.finished_at),
            "members": self.members, "entered": self.entered, "exited": self.exited,
            "changed": self.changed, "queued": self.queued, "forced": self.forced,
            "skipped": self.skipped, "error": self.error, "fan_out": self.fan_out,
        }

    def summary(self) -> dict[str, Any]:
        """`status`'s last_run: the record's shape less key and forced, and `id` too, as
        status has always named it."""
        document = {name: value for name, value in self.as_dict().items()
                    if name not in ("key", "forced")}
        document["id"] = self.id
        return document


def run_record_of(row: Row[Any]) -> RunRecord:
    """A row of runs_query() as its record."""
    return RunRecord(
        id=row.id, key=row.key, kind=RunKind(row.kind), status=RunStatus(row.status),
        clock=row.clock, finished_at=row.finished_at, members=row.members,
        entered=row.entered, exited=row.exited, changed=row.changed, queued=row.queued,
        forced=bool(row.forced), skipped_null=row.skipped_null,
        skipped_empty=row.skipped_empty, skipped_too_long=row.skipped_too_long,
        skipped_duplicate=row.skipped_duplicate, error=row.error,
        skipped_bad_type=row.skipped_bad_type, skipped_non_finite=row.skipped_non_finite,
        fencing_token=row.fencing_token, started_at=row.started_at, fan_users=row.fan_users,
        fan_entered=row.fan_entered, fan_exited=row.fan_exited, fan_changed=row.fan_changed)


def runs_query() -> Select[Any]:
    """Runs with their audience's key, for run_record_of."""
    r, c = t.runs, t.computations
    return select(r, c.c.key).join(c, c.c.id == r.c.computation_id)


@dataclass(frozen=True)
class Progress:
    """An initial sync being delivered: `done` of `total` deliveries no longer waiting."""

    run_id: int
    total: int
    done: int
    pending: int
    failed: int
    rate: float | None  # deliveries acknowledged per second over the last minutes
    eta_seconds: float | None
    started_at: datetime | None = None  # when the initial run began

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "started_at": iso(self.started_at),
                "total": self.total, "done": self.done, "pending": self.pending,
                "failed": self.failed, "rate_per_second": self.rate,
                "eta_seconds": self.eta_seconds}
