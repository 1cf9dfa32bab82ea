"""The one rate limiter: GCRA (evenly spaced request slots), with a pluggable slot source.

The limiter's single piece of state is the next free slot. Where it lives is the slot source:
- `LocalSlots`: in this process (one limiter per destination client, shared by its threads);
- `state.leases.StoreSlots`: the `rate_budgets` table, shared by every process draining the
  destination from one state store (daemons, CLI sync, resync and retry).
A limiter takes a block of consecutive slots per round trip to its source (one for local
slots; about BLOCK_SECONDS of the rate from the store, one `UPDATE ... RETURNING`) and hands
them to its threads one request at a time. A 429 with Retry-After pushes the source's next free
slot past the pause: every thread (and every process sharing the store) holds, not only the
one that was told. Spacing instead of bursting keeps us under a server that counts in short
windows. Shared slots are wall-clock Unix seconds: hosts need synchronised clocks (NTP).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from audience_sync.config import PlanhatConfig, RateLimit, SegmentConfig

if TYPE_CHECKING:
    from audience_sync.state.store import Store

# Slots taken per round trip to a shared source: about this many seconds of the rate, at least
# one. Small enough that an idle process wastes little of the budget, large enough that a busy
# one does not make a round trip per request at Planhat's rates.
BLOCK_SECONDS = 0.05
MAX_BLOCK = 32


class SlotSource(Protocol):
    """Where a limiter's next free slot lives."""

    def take(self, earliest: float, slots: int, interval: float) -> float:
        """next_free = max(next_free, earliest) + slots * interval, atomically; the start of
        the slots taken."""
        ...


class LocalSlots:
    """The next free slot in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_free = 0.0

    def take(self, earliest: float, slots: int, interval: float) -> float:
        with self._lock:
            start = max(self._next_free, earliest)
            self._next_free = start + slots * interval
            return start


class RateLimiter:
    """`acquire()` waits until one request slot is ours (GCRA, burst 1)."""

    def __init__(self, rate: RateLimit, slots: SlotSource | None = None, *, block: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.interval = 1.0 / rate.per_second
        self.slots = slots if slots is not None else LocalSlots()
        self.block = block
        self.clock = clock
        self._lock = threading.Lock()
        self._next_slot = 0.0  # the next slot of our block
        self._left = 0  # slots of our block not handed out yet

    def reserve(self, n: int = 1) -> float:
        """Take the next n slots from the source; the clock time the first starts."""
        return self.slots.take(self.clock(), n, self.interval)

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
        """Nobody sends before then (a 429's Retry-After): the source's next free slot moves
        past it and our block's remaining slots are given up."""
        at = monotonic_at if self.clock is time.monotonic else \
            self.clock() + (monotonic_at - time.monotonic())
        with self._lock:
            self._left = 0
            self.slots.take(at, 0, self.interval)


def shared_limiter(store: Store, name: str, settings: object) -> RateLimiter | None:
    """The destination's request budget kept in the state store, shared by every process that
    drains it: each is configured with the full rate and together they stay within it. None
    for destinations without a rate limit (jsonl)."""
    if isinstance(settings, PlanhatConfig):
        rate = settings.effective_rate_limit
    elif isinstance(settings, SegmentConfig):
        rate = settings.rate_limit
    else:
        return None
    return store_limiter(store, name, rate)


def store_limiter(store: Store, name: str, rate: RateLimit, *,
                  clock: Callable[[], float] = time.time) -> RateLimiter:
    """A limiter whose slots are the destination's budget in the state store (wall clock)."""
    from audience_sync.state.leases import StoreSlots

    block = max(1, min(MAX_BLOCK, int(rate.per_second * BLOCK_SECONDS)))
    return RateLimiter(rate, StoreSlots(store, name), block=block, clock=clock)
