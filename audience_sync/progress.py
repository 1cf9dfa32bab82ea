"""Progress of long work (a snapshot load, a delivery): counts, rate, ETA, told as it goes.

On a terminal a rich bar per piece of work; elsewhere (cron, a pipe, a log collector) one
plain INFO log line every `every` seconds or every `step` of the total, whichever comes first.
The intervals and the clock are parameters, so tests read the lines without sleeping.
A pure module: it knows nothing of databases or destinations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from audience_sync.clock import duration

log = logging.getLogger("audience_sync.progress")

EVERY_SECONDS = 10.0
EVERY_FRACTION = 0.1
# The rate is measured over the last few minutes: a 6-hour delivery's ETA follows the
# destination's current pace, not its first minute's.
RATE_WINDOW_SECONDS = 300.0


class Tracker(Protocol):
    def update(self, done: int) -> None: ...

    def close(self) -> None: ...


class Meter:
    """Work done toward a total (None: not known), its rate over the last minutes and ETA."""

    def __init__(self, label: str, total: int | None, *, unit: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 window: float = RATE_WINDOW_SECONDS) -> None:
        self.label, self.total, self.unit, self.clock, self.window = \
            label, total, unit, clock, window
        self.done = 0
        self.started = clock()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])

    def update(self, done: int) -> None:
        now = self.clock()
        self.done = done
        self._samples.append((now, done))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        """Per second, over the last `window` seconds; None before any time has passed."""
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if self.total is None or not rate:
            return None
        return max(0, self.total - self.done) / rate

    def line(self) -> str:
        """`planhat: 1,200/5,000 delivered (24%), 40/s, ETA 1 min`; with no total
        `snapshot: 120,000 rows, 60,000/s`."""
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            text = f"{self.label}: {self.done:,}{unit}"
        else:
            percent = 100 * self.done / self.total if self.total else 100.0
            text = f"{self.label}: {self.done:,}/{self.total:,}{unit} ({percent:.0f}%)"
        rate = self.rate
        if rate is not None:
            text += f", {rate:,.0f}/s"
        eta = self.eta_seconds
        if self.total is not None and self.done < self.total:
            text += f", ETA {duration(eta)}" if eta is not None else ", ETA unknown"
        return text


class LogLines:
    """A Meter told as INFO log lines: every `every` seconds or `step` of the total."""

    def __init__(self, meter: Meter, *, every: float = EVERY_SECONDS,
                 step: float = EVERY_FRACTION) -> None:
        self.meter, self.every, self.step = meter, every, step
        self._told_at = meter.started
        self._told_done = 0
        self._lock = threading.Lock()

    def update(self, done: int) -> None:
        with self._lock:
            meter = self.meter
            meter.update(done)
            now = meter.clock()
            stepped = meter.total is not None and meter.total > 0 and \
                (done - self._told_done) >= self.step * meter.total
            if now - self._told_at >= self.every or stepped:
                self._told_at, self._told_done = now, done
                log.info("%s", meter.line(), extra={"fields": self.fields()})

    def advance(self, n: int) -> None:
        self.update(self.meter.done + n)

    def fields(self) -> dict[str, Any]:
        meter = self.meter
        rate, eta = meter.rate, meter.eta_seconds
        return {"progress": meter.label, "done": meter.done, "total": meter.total,
                "rate": round(rate, 3) if rate is not None else None,
                "eta_seconds": round(eta, 1) if eta is not None else None}

    def close(self) -> None:
        with self._lock:
            if self.meter.done != self._told_done:
                log.info("%s", self.meter.line(), extra={"fields": self.fields()})


class Bars:
    """Rich bars on stderr, one per piece of work, removed when the work is done."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 transient=True, console=Console(stderr=True))
        self.progress.start()

    def tracker(self, label: str, total: int | None) -> Tracker:
        task = self.progress.add_task(label, total=total)
        progress = self.progress

        class _Task:
            def update(self, done: int) -> None:
                progress.update(task, completed=done)

            def close(self) -> None:
                progress.remove_task(task)
        return _Task()

    def close(self) -> None:
        self.progress.stop()


class DeliveryProgress:
    """What the drain asks for each destination: `tracker(name, total)`; closed at the end."""

    def __init__(self, terminal: bool, *, every: float = EVERY_SECONDS,
                 step: float = EVERY_FRACTION, clock: Callable[[], float] = time.monotonic) -> None:
        self.every, self.step, self.clock = every, step, clock
        self._bars = Bars() if terminal else None

    def tracker(self, name: str, total: int) -> Tracker:
        if self._bars is not None:
            return self._bars.tracker(f"{name}: sending", total)
        return LogLines(Meter(name, total, unit="delivered", clock=self.clock),
                        every=self.every, step=self.step)

    def __enter__(self) -> DeliveryProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._bars is not None:
            self._bars.close()


def bars_or_lines(terminal: bool) -> DeliveryProgress:
    return DeliveryProgress(terminal)
