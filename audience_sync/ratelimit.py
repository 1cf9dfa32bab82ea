"""A destination's request budget shared by every process draining it from one state store.

The limiter is GCRA (evenly spaced request slots) whose single piece of state, the next free
slot, lives in the `rate_budgets` table. A process takes a small block of consecutive slots in
one statement (`UPDATE ... RETURNING`, one round trip) and hands them to its threads one request
at a time, so daemons on several hosts together stay within the configured rate. A 429 with
Retry-After pushes the shared next free slot past the pause: every process holds, not only the
one that was told. Slots are wall-clock Unix seconds: hosts need synchronised clocks (NTP).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from audience_sync.config import PlanhatDestination, RateLimit, SegmentDestination
from audience_sync.state.leases import ensure_rate_budget, take_rate_slots
from audience_sync.state.store import Store

# Slots taken per round trip: about this many seconds of the rate, at least one. Small enough
# that an idle process wastes little of the budget, large enough that a busy one does not make
# a round trip per request at Planhat's rates.
BLOCK_SECONDS = 0.05
MAX_BLOCK = 32


class SharedRateLimiter:
    """`acquire()` waits until one request slot of the destination's shared budget is ours."""

    def __init__(self, store: Store, destination: str, rate: RateLimit, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.destination = destination
        self.rate = rate
        self.interval = 1.0 / rate.per_second
        self.block = max(1, min(MAX_BLOCK, int(rate.per_second * BLOCK_SECONDS)))
        self.clock = clock
        self._lock = threading.Lock()
        self._next_slot = 0.0  # the next slot of our block
        self._left = 0  # slots of our block not handed out yet
        self._ensure_row()

    def _ensure_row(self) -> None:
        ensure_rate_budget(self.store, self.destination)

    def _push(self, earliest: float, slots: int) -> float:
        """next_free = max(next_free, earliest) + slots * interval; the start of the slots."""
        return take_rate_slots(self.store, self.destination, earliest, slots, self.interval)

    def reserve(self, n: int = 1) -> float:
        """Take the next n slots of the shared budget; the wall-clock time the first starts."""
        return self._push(self.clock(), n)

    def _take(self) -> float:
        with self._lock:
            if self._left and self._next_slot < self.clock() - self.interval:
                # We fell behind our own block (a pause, a busy CPU): its slots are past, and
                # using them now would bunch requests. Give them up: unused budget is only
                # unused, while late slots sent at once could overrun the destination's limit.
                self._left = 0
            if self._left == 0:
                self._next_slot = self.reserve(self.block)
                self._left = self.block
            slot = self._next_slot
            self._next_slot += self.interval
            self._left -= 1
            return slot

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for a slot; False when `stop` was set meanwhile (the slot is spent anyway)."""
        delay = self._take() - self.clock()
        waiter = stop if stop is not None else threading.Event()
        if delay > 0 and waiter.wait(delay) and stop is not None:
            return False
        return not (stop is not None and stop.is_set())

    def hold_until(self, monotonic_at: float) -> None:
        """Nobody sends before then (a 429's Retry-After): the shared next slot moves past it
        and our block's remaining slots are given up."""
        wall_at = self.clock() + (monotonic_at - time.monotonic())
        with self._lock:
            self._left = 0
            self._push(wall_at, 0)


def shared_limiter(store: Store, name: str, settings: object) -> SharedRateLimiter | None:
    """The destination's request budget kept in the state store, shared by every process that
    drains it (daemons, CLI sync, resync and retry): each is configured with the full rate and
    together they stay within it. None for destinations without a rate limit (jsonl)."""
    if isinstance(settings, PlanhatDestination):
        rate = settings.effective_rate_limit
    elif isinstance(settings, SegmentDestination):
        rate = settings.rate_limit
    else:
        return None
    return SharedRateLimiter(store, name, rate)
