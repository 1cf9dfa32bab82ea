"""Chart geometry for the server-drawn SVGs: pure functions from figures to coordinates.

The templates only place what these return, so a chart is tested as numbers, not markup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

# Room for the axis labels inside the SVG's own box (user units).
LEFT, RIGHT, TOP, BOTTOM = 56.0, 12.0, 10.0, 22.0


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    clipped: bool = False  # taller than the scale (an initial run's every member)


@dataclass(frozen=True)
class Tick:
    at: float  # x or y, in user units
    label: str


@dataclass(frozen=True)
class LineChart:
    width: float
    height: float
    points: tuple[Point, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True)
class BarChart:
    width: float
    height: float
    baseline: float
    entered: tuple[Bar, ...]
    exited: tuple[Bar, ...]
    y_ticks: tuple[Tick, ...]


def sparkline(values: Sequence[int], width: float = 120, height: float = 24) -> str:
    """`points` for an SVG polyline: the values left to right, scaled to the box."""
    if not values:
        return ""
    low, high = min(values), max(values)
    span = high - low or 1
    step = width / max(len(values) - 1, 1)
    pad = 2.0
    return " ".join(
        f"{i * step:.1f},{pad + (height - 2 * pad) * (1 - (v - low) / span):.1f}"
        for i, v in enumerate(values))


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten at or above `raw`, and at least 1
    (the figures are counts)."""
    if raw <= 1:
        return 1.0
    base = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * base >= raw:
            return factor * base
    return 10 * base  # pragma: no cover - factor 10 always fits


def axis(low: float, high: float, ticks: int = 4) -> tuple[float, float]:
    """(bottom, step) of a y axis with `ticks` nice steps covering [low, high]. It starts at
    zero unless the values sit far from it: a 1,000,000-member audience moving by 1% per run
    would otherwise draw a flat line."""
    start = low if low > (high - low) else 0.0
    step = _nice_step(max(high - start, 1) / ticks)
    bottom = math.floor(start / step) * step
    while bottom + ticks * step < high:
        step = _nice_step(step * 1.001)
        bottom = math.floor(start / step) * step
    return bottom, step


def _ticks(bottom: float, step: float, y_of: Callable[[float], float],
           ticks: int = 4) -> tuple[Tick, ...]:
    return tuple(Tick(y_of(bottom + step * i), f"{round(bottom + step * i):,}")
                 for i in range(ticks + 1))


def line_chart(series: Sequence[tuple[datetime, int, str]], width: float = 600,
               height: float = 220) -> LineChart:
    """One point per (time, value, label), time on the x axis (runs are not evenly spaced)."""
    inner_w, inner_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    values = [v for _, v, _ in series] or [0]
    bottom, step = axis(min(values), max(values))
    first = series[0][0] if series else None
    last = series[-1][0] if series else None
    span = (last - first).total_seconds() if first and last else 0.0

    def x_of(at: datetime) -> float:
        if not span or first is None:
            return LEFT + inner_w / 2
        return LEFT + inner_w * (at - first).total_seconds() / span

    def y_of(value: float) -> float:
        return TOP + inner_h * (1 - (value - bottom) / (4 * step))

    points = tuple(Point(x_of(at), y_of(v), label) for at, v, label in series)
    x_ticks: tuple[Tick, ...] = ()
    if first is not None and last is not None:
        x_ticks = (Tick(x_of(first), first.strftime("%Y-%m-%d %H:%M")),) if not span else (
            Tick(LEFT, first.strftime("%Y-%m-%d %H:%M")),
            Tick(LEFT + inner_w, last.strftime("%Y-%m-%d %H:%M")))
    return LineChart(width, height, points, _ticks(bottom, step, y_of), x_ticks)


def bar_chart(series: Sequence[tuple[int, int, str, bool]], width: float = 600,
              height: float = 220) -> BarChart:
    """Entered above and exited below a middle baseline, one slot per run, oldest left.

    Each item is (entered, exited, label, outlier); outliers (initial runs, which enter every
    member) do not set the scale when other runs exist: their bars are clipped and say so.
    """
    inner_w, inner_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    usual = [max(e, x) for e, x, _, outlier in series if not outlier]
    scale = usual if any(usual) else [max(e, x) for e, x, _, _ in series]
    top = _nice_step(max(scale, default=0) / 4) * 4
    baseline = TOP + inner_h / 2
    slot = inner_w / max(len(series), 1)
    bar_w = min(max(slot * 0.7, 0.5), 24.0)
    half = inner_h / 2
    entered, exited = [], []
    for i, (n_in, n_out, label, _) in enumerate(series):
        x = LEFT + i * slot + (slot - bar_w) / 2
        h_in, h_out = min(half, half * n_in / top), min(half, half * n_out / top)
        entered.append(Bar(x, baseline - h_in, bar_w, h_in, f"{label}: +{n_in:,}",
                           clipped=n_in > top))
        exited.append(Bar(x, baseline, bar_w, h_out, f"{label}: -{n_out:,}",
                          clipped=n_out > top))
    ticks = (Tick(TOP, f"+{int(top):,}"), Tick(baseline, "0"),
             Tick(TOP + inner_h, f"-{int(top):,}"))
    return BarChart(width, height, baseline, tuple(entered), tuple(exited), ticks)
