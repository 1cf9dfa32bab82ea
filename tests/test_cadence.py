"""Cadence: pure functions of stored timestamps and a frozen clock."""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from audience_sync.cadence import (
    Cadence,
    due_at,
    due_keys,
    failure_backoff,
    is_due,
    jitter_offset,
    next_due_after_failure,
    next_due_after_success,
)

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
TWO_HOURS = Cadence(every=timedelta(hours=2), jitter=timedelta(minutes=10))
TICK = timedelta(seconds=30)


@dataclasses.dataclass(frozen=True)
class Row:
    """The stored columns cadence reads, as store.ComputationRow holds them."""

    key: str
    initial_state: str = "pending"
    next_due_at: datetime | None = None
    last_success_at: datetime | None = None
    consecutive_failures: int = 0


def now() -> datetime:
    return datetime.now(UTC)


def succeed(row: Row, finished: datetime, cadence: Cadence, *, queued: bool = False) -> Row:
    """What the runner stores after a successful run."""
    initial = row.initial_state
    if initial == "pending":
        initial = "delivering" if queued else "complete"
    return dataclasses.replace(
        row, initial_state=initial, last_success_at=finished, consecutive_failures=0,
        next_due_at=next_due_after_success(row.key, finished, cadence.every, cadence.jitter))


def fail(row: Row, finished: datetime, cadence: Cadence) -> Row:
    failures = row.consecutive_failures + 1
    return dataclasses.replace(row, consecutive_failures=failures,
                               next_due_at=next_due_after_failure(finished, failures,
                                                                  cadence.every))


def test_a_new_audience_is_due_at_once() -> None:
    with freeze_time(T0):
        row = Row("new_audience")
        assert is_due(row, TWO_HOURS, now())
        assert due_keys([row], {"new_audience": TWO_HOURS}, now()) == ["new_audience"]


def test_a_registered_audience_is_due_at_its_stored_time() -> None:
    row = Row("a", next_due_at=T0)
    assert not is_due(row, TWO_HOURS, T0 - timedelta(seconds=1))
    assert is_due(row, TWO_HOURS, T0)


def test_incremental_every_two_hours_with_deterministic_jitter() -> None:
    with freeze_time(T0) as frozen:
        row = succeed(Row("high_value"), now(), TWO_HOURS)
        runs = [now()]
        # Tick every 30s for a day; run whenever due; each run takes a minute.
        for _ in range(int(timedelta(days=1) / TICK)):
            frozen.tick(TICK)
            if is_due(row, TWO_HOURS, now()):
                frozen.tick(timedelta(minutes=1))
                runs.append(now())
                row = succeed(row, now(), TWO_HOURS)
    offset = jitter_offset("high_value", TWO_HOURS.jitter)
    assert timedelta(minutes=-10) <= offset <= timedelta(minutes=10)
    assert offset != timedelta(0)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    # Each gap is every + jitter + the minute the run took, give or take one tick.
    for gap in gaps:
        assert abs(gap - (TWO_HOURS.every + offset + timedelta(minutes=1))) <= TICK
    assert len(runs) in (12, 13)


def test_jitter_is_the_same_on_every_replica_and_spreads_audiences() -> None:
    finished = T0
    first = next_due_after_success("a", finished, TWO_HOURS.every, TWO_HOURS.jitter)
    assert first == next_due_after_success("a", finished, TWO_HOURS.every, TWO_HOURS.jitter)
    offsets = {jitter_offset(f"audience_{i}", TWO_HOURS.jitter) for i in range(20)}
    assert len(offsets) == 20
    assert all(abs(o) <= TWO_HOURS.jitter for o in offsets)


def test_jitter_is_capped_at_half_the_cadence() -> None:
    short = Cadence(every=timedelta(seconds=10), jitter=timedelta(hours=1))
    for i in range(50):
        due = next_due_after_success(f"k{i}", T0, short.every, short.jitter)
        assert T0 + timedelta(seconds=5) <= due <= T0 + timedelta(seconds=15)


def test_no_jitter_means_exactly_every() -> None:
    assert next_due_after_success("a", T0, timedelta(hours=2), timedelta(0)) == \
        T0 + timedelta(hours=2)


def test_long_initial_sync_holds_the_cadence_until_delivered() -> None:
    cadence = TWO_HOURS
    with freeze_time(T0) as frozen:
        row = succeed(Row("big"), now(), cadence, queued=True)
        assert row.initial_state == "delivering"
        # Five hours at Planhat's rate limit: never due for a run meanwhile.
        for _ in range(int(timedelta(hours=5) / TICK)):
            frozen.tick(TICK)
            assert due_at(row, cadence) is None
            assert not is_due(row, cadence, now())
        # A restart reads the same stored state: still delivering, still not due.
        restarted = dataclasses.replace(row)
        assert not is_due(restarted, cadence, now())
        # The drain finished: one incremental catches up at once, then every 2h from it.
        row = dataclasses.replace(row, initial_state="complete")
        assert due_keys([row], {"big": cadence}, now()) == ["big"]
        frozen.tick(timedelta(minutes=1))
        row = succeed(row, now(), cadence)
        assert not is_due(row, cadence, now() + timedelta(hours=1))
        assert is_due(row, cadence, now() + cadence.every + cadence.jitter)


def test_failed_run_backs_off_and_the_backoff_is_capped_at_every() -> None:
    assert [failure_backoff(n, timedelta(hours=2)) for n in range(1, 10)] == [
        timedelta(minutes=m) for m in (1, 2, 4, 8, 16, 32, 64, 120, 120)]
    assert failure_backoff(10_000, timedelta(hours=2)) == timedelta(hours=2)
    with freeze_time(T0) as frozen:
        row = succeed(Row("flaky", initial_state="complete"), now(), TWO_HOURS)
        frozen.move_to(row.next_due_at)
        retries: list[datetime] = []
        for _ in range(12):
            assert row.next_due_at is not None
            frozen.move_to(row.next_due_at)
            assert is_due(row, TWO_HOURS, now())
            retries.append(now())
            row = fail(row, now(), TWO_HOURS)
            assert not is_due(row, TWO_HOURS, now())
        gaps = [b - a for a, b in itertools.pairwise(retries)]
        assert gaps[:3] == [timedelta(minutes=1), timedelta(minutes=2), timedelta(minutes=4)]
        assert max(gaps) == TWO_HOURS.every
        # Success resets the backoff: back to the normal cadence.
        row = succeed(row, now(), TWO_HOURS)
        assert row.consecutive_failures == 0
        assert not is_due(row, TWO_HOURS, now() + timedelta(minutes=30))


def test_a_failed_initial_run_is_retried_with_backoff() -> None:
    with freeze_time(T0):
        row = fail(Row("new"), now(), TWO_HOURS)
        assert row.initial_state == "pending"
        assert not is_due(row, TWO_HOURS, now())
        assert is_due(row, TWO_HOURS, now() + timedelta(minutes=1))


def test_a_day_of_downtime_runs_each_audience_once() -> None:
    keys = [f"audience_{i}" for i in range(5)]
    cadences = {k: TWO_HOURS for k in keys}
    with freeze_time(T0) as frozen:
        rows = {k: succeed(Row(k), now(), TWO_HOURS) for k in keys}
        frozen.tick(timedelta(days=1))  # the daemon was down
        runs: dict[str, int] = dict.fromkeys(keys, 0)
        # The daemon is back: ten minutes of 30s ticks.
        for _ in range(20):
            for key in due_keys(rows.values(), cadences, now()):
                runs[key] += 1
                rows[key] = succeed(rows[key], now(), TWO_HOURS)
            frozen.tick(TICK)
    assert runs == dict.fromkeys(keys, 1)


def test_due_keys_orders_never_run_first_then_most_overdue_and_skips_orphans() -> None:
    rows = [
        Row("late", initial_state="complete", next_due_at=T0 - timedelta(hours=1)),
        Row("later", initial_state="complete", next_due_at=T0 - timedelta(hours=3)),
        Row("fresh"),
        Row("not_yet", initial_state="complete", next_due_at=T0 + timedelta(minutes=1)),
        Row("delivering", initial_state="delivering", next_due_at=T0 - timedelta(hours=9)),
        Row("orphan", initial_state="complete", next_due_at=T0 - timedelta(hours=9)),
    ]
    cadences = {r.key: TWO_HOURS for r in rows if r.key != "orphan"}
    assert due_keys(rows, cadences, T0) == ["fresh", "later", "late"]


def test_per_audience_schedule_override() -> None:
    hourly = Cadence(every=timedelta(hours=1), jitter=timedelta(0))
    daily = Cadence(every=timedelta(days=1), jitter=timedelta(0))
    rows = [succeed(Row("hourly"), T0, hourly), succeed(Row("daily"), T0, daily)]
    cadences = {"hourly": hourly, "daily": daily}
    assert due_keys(rows, cadences, T0 + timedelta(hours=1)) == ["hourly"]
    assert due_keys(rows, cadences, T0 + timedelta(days=1)) == ["hourly", "daily"]


def test_complete_without_stored_due_time_counts_from_last_success() -> None:
    row = Row("old", initial_state="complete", last_success_at=T0)
    cadence = Cadence(every=timedelta(hours=2), jitter=timedelta(0))
    assert due_at(row, cadence) == T0 + timedelta(hours=2)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        is_due(Row("a"), TWO_HOURS, datetime(2026, 1, 1))
