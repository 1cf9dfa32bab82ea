"""A destination's request budget shared by every daemon on one state store.

The limiter is GCRA (evenly spaced request slots) whose single piece of state, the next free
slot, lives in the `rate_budgets` table: a reservation is one short write transaction (SQLite's
write lock, PostgreSQL's row lock), so daemons on several hosts together stay within the
configured rate. Slots are wall-clock Unix seconds: hosts need synchronised clocks (NTP).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from audience_sync import schema as t
from audience_sync.config import RateLimit
from audience_sync.errors import StoreError
from audience_sync.store import Store


class SharedRateLimiter:
    """`acquire(n)` waits until n request slots of the destination's shared budget are ours."""

    def __init__(self, store: Store, destination: str, rate: RateLimit, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.destination = destination
        self.interval = 1.0 / rate.per_second
        self.clock = clock
        self._ensure_row()

    def _ensure_row(self) -> None:
        b = t.rate_budgets
        try:
            with self.store.write() as conn:
                if conn.execute(select(b.c.destination)
                                .where(b.c.destination == self.destination)).first() is None:
                    conn.execute(insert(b).values(destination=self.destination, next_free=0.0))
        except (IntegrityError, StoreError):
            pass  # another daemon created it at the same moment

    def reserve(self, n: int = 1) -> float:
        """Take the next n slots; the wall-clock time at which the first one starts."""
        b = t.rate_budgets
        with self.store.write() as conn:
            current = conn.execute(select(b.c.next_free).where(b.c.destination == self.destination)
                                   .with_for_update()).scalar_one()
            start = max(self.clock(), float(current))
            conn.execute(update(b).where(b.c.destination == self.destination)
                         .values(next_free=start + n * self.interval))
        return start

    def acquire(self, n: int = 1, stop: threading.Event | None = None) -> bool:
        """Wait for n slots; False when `stop` was set meanwhile (the slots are spent anyway)."""
        delay = self.reserve(n) - self.clock()
        waiter = stop if stop is not None else threading.Event()
        if delay > 0 and waiter.wait(delay) and stop is not None:
            return False
        return not (stop is not None and stop.is_set())
