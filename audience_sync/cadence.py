"""When each audience is due: pure functions of stored timestamps and the clock."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

# A failed run is retried after 1, 2, 4, ... minutes, never later than the normal cadence.
FAILURE_BACKOFF_BASE = timedelta(minutes=1)


def jitter_offset(key: str, slot: datetime, jitter: timedelta) -> timedelta:
    """A deterministic offset in [-jitter, +jitter] per audience and slot, so replicas agree."""
    if jitter.total_seconds() <= 0:
        return timedelta(0)
    digest = hashlib.sha256(f"{key}|{slot.isoformat()}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64  # [0, 1)
    return timedelta(seconds=(2 * fraction - 1) * jitter.total_seconds())


def next_due_after_success(key: str, finished_at: datetime, every: timedelta,
                           jitter: timedelta) -> datetime:
    return finished_at + every + jitter_offset(key, finished_at, min(jitter, every / 2))


def next_due_after_failure(finished_at: datetime, failures: int, every: timedelta) -> datetime:
    backoff = FAILURE_BACKOFF_BASE * (2 ** max(0, min(failures - 1, 20)))
    return finished_at + min(backoff, every)
