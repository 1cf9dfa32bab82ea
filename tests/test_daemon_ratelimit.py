"""The destination budget shared by daemons lives in the state store: its rate holds in total."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from audience_sync.config import RateLimit
from audience_sync.ratelimit import SharedRateLimiter
from audience_sync.store import Store

RATE = 50.0


def test_three_processes_sharing_a_budget_stay_within_its_rate_in_total(
        state_url: str, tmp_path: Path) -> None:
    Store(state_url).upgrade()
    stamps: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(3)

    def worker() -> None:
        store = Store(state_url)  # a store of its own, as another daemon would have
        limiter = SharedRateLimiter(store, "planhat", RateLimit(RATE, 1))
        barrier.wait()
        for _ in range(20):
            assert limiter.acquire()
            with lock:
                stamps.append(time.time())
        store.dispose()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stamps.sort()
    assert len(stamps) == 60
    # 60 requests at 50/s take at least 59 intervals, whoever sends them.
    assert stamps[-1] - stamps[0] >= 59 / RATE - 0.05
    # No one-second window holds more than the rate (plus the one at its edge).
    for i, start in enumerate(stamps):
        in_window = sum(1 for s in stamps[i:] if s < start + 1.0)
        assert in_window <= RATE + 1


def test_stop_ends_the_wait(state_url: str) -> None:
    store = Store(state_url)
    store.upgrade()
    limiter = SharedRateLimiter(store, "segment", RateLimit(1, 60))
    assert limiter.acquire()
    stop = threading.Event()
    stop.set()
    assert not limiter.acquire(stop=stop)
    store.dispose()
