"""When each audience is due: pure functions of stored timestamps and the clock.

The runner stores `next_due_at` when a run ends (success, failure or hold); due-ness is read
back from the stored state and the time `at` the caller hands in, so a restart never resets a
cadence, and a daemon that was down for a day finds one overdue slot per audience, not one per
missed slot (the next slot is counted from when the overdue run finished).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from audience_sync.states import InitialState

# A failed run is retried after 1, 2, 4, ... minutes, never later than the normal cadence.
FAILURE_BACKOFF_BASE = timedelta(minutes=1)
# 2**20 minutes is two years: far past any cadence, and small enough not to overflow.
_MAX_DOUBLINGS = 20


def jitter_offset(key: str, jitter: timedelta) -> timedelta:
    """A deterministic offset in [-jitter, +jitter] per audience, so every replica agrees.

    A fixed offset per audience spreads audiences of one cadence apart without drifting.
    """
    if jitter.total_seconds() <= 0:
        return timedelta(0)
    digest = hashlib.sha256(key.encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64  # [0, 1)
    return timedelta(seconds=(2 * fraction - 1) * jitter.total_seconds())


def next_due_after_success(key: str, finished_at: datetime, every: timedelta,
                           jitter: timedelta) -> datetime:
    """The next incremental run: `every` after this one finished, shifted by the audience's jitter.

    Jitter is capped at half the cadence so runs never bunch up or overlap.
    """
    _check_aware(finished_at)
    return finished_at + every + jitter_offset(key, min(jitter, every / 2))


def failure_backoff(failures: int, every: timedelta) -> timedelta:
    """1, 2, 4, ... minutes after the n-th consecutive failure, capped at `every`."""
    doublings = max(0, min(failures - 1, _MAX_DOUBLINGS))
    backoff: timedelta = FAILURE_BACKOFF_BASE * (2**doublings)
    return min(backoff, every)


def next_due_after_failure(finished_at: datetime, failures: int, every: timedelta) -> datetime:
    _check_aware(finished_at)
    return finished_at + failure_backoff(failures, every)


class CadenceState(Protocol):
    """What cadence reads from a stored computation row (store.ComputationRow has it)."""

    @property
    def key(self) -> str: ...
    @property
    def initial_state(self) -> str: ...
    @property
    def next_due_at(self) -> datetime | None: ...
    @property
    def last_success_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class Cadence:
    every: timedelta
    jitter: timedelta


def due_at(state: CadenceState, cadence: Cadence) -> datetime | None:
    """When the next run of this audience is due; None while none is (initial still delivering).

    - never run (`pending`): due at once, or at the retry time a failed initial run stored;
    - initial run committed, deliveries outstanding (`delivering`): the incremental cadence has
      not started; the drain keeps sending, and after a restart it resumes where it stopped;
    - `complete`: the stored `next_due_at`. When the initial deliveries took longer than `every`,
      that moment has passed and one incremental run catches up at once, then the cadence goes on.
    """
    if state.initial_state == InitialState.DELIVERING:
        return None
    if state.next_due_at is not None:
        return state.next_due_at
    if state.initial_state == InitialState.COMPLETE and state.last_success_at is not None:
        return next_due_after_success(state.key, state.last_success_at, cadence.every,
                                      cadence.jitter)
    return _EPOCH


def is_due(state: CadenceState, cadence: Cadence, at: datetime) -> bool:
    _check_aware(at)
    when = due_at(state, cadence)
    return when is not None and when <= at


def due_keys(states: Iterable[CadenceState], cadences: Mapping[str, Cadence],
             at: datetime) -> list[str]:
    """The configured audiences due at `at`, most overdue first (never-run ones first of all).

    Stored rows without a configured cadence (orphaned audiences) are never due.
    """
    due: list[tuple[int, datetime, str]] = []
    for state in states:
        cadence = cadences.get(state.key)
        if cadence is None:
            continue
        when = due_at(state, cadence)
        if when is not None and when <= at:
            due.append((0 if state.initial_state == InitialState.PENDING else 1, when, state.key))
    return [key for _, _, key in sorted(due)]


def _check_aware(value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("cadence needs timezone-aware datetimes")


_EPOCH = datetime.fromisoformat("1970-01-01T00:00:00+00:00")
