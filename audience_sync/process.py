"""Process-wide settings, applied once when the command line starts (and by the benchmarks,
which run the same code without it)."""

from __future__ import annotations

import gc

# Container objects allocated, net of those freed, before the collector's youngest generation
# runs. Python's default is 700: a snapshot chunk or an outbox claim holds a few thousand row
# tuples at once, so every batch set the collector off several times and pushed its rows into
# older generations to be walked again (14% of a 100,000-delivery drain's CPU; 0.4% at this).
GC_THRESHOLD = 10_000


def tune_garbage_collector() -> None:
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)
