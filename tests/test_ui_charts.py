"""Chart geometry as numbers: axes, one point per run, bars that keep initial runs off the
scale."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from audience_sync.ui.charts import LEFT, TOP, axis, bar_chart, line_chart, sparkline

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.mark.parametrize(("low", "high", "expected"), [
    (0, 0, (0.0, 1.0)),
    (0, 611, (0.0, 200.0)),            # near zero: the axis starts at zero
    (600, 680, (600.0, 20.0)),         # far from zero: zoomed in
    (990_000, 1_010_000, (990_000.0, 5_000.0)),
    (5, 6, (5.0, 1.0)),
])
def test_axis_covers_the_values_in_nice_steps(low: int, high: int,
                                              expected: tuple[float, float]) -> None:
    bottom, step = axis(low, high)
    assert (bottom, step) == expected
    assert bottom <= low and bottom + 4 * step >= high


def test_line_chart_has_one_point_per_run_on_a_time_axis() -> None:
    series = [(T0, 10, "a"), (T0 + timedelta(hours=1), 20, "b"), (T0 + timedelta(hours=4), 15, "c")]
    chart = line_chart(series, width=400, height=200)
    assert [p.label for p in chart.points] == ["a", "b", "c"]
    xs = [p.x for p in chart.points]
    assert xs[0] == LEFT and xs[2] == 400 - 12
    # Time, not run number, spaces the points: 1 hour, then 3.
    assert (xs[2] - xs[1]) == pytest.approx(3 * (xs[1] - xs[0]))
    assert chart.points[1].y < chart.points[2].y < chart.points[0].y
    assert len(chart.polyline.split()) == 3
    single = line_chart([(T0, 7, "only")])
    assert len(single.points) == 1 and single.points[0].y >= TOP


def test_bar_chart_keeps_the_initial_run_off_the_scale() -> None:
    chart = bar_chart([(1000, 0, "initial", True), (3, 1, "r2", False), (0, 4, "r3", False)],
                      height=220)
    half = chart.baseline - TOP
    first, second, third = chart.entered
    assert first.clipped and first.height == pytest.approx(half)
    assert not second.clipped and 0 < second.height < half
    assert third.height == 0 and chart.exited[2].height > chart.exited[1].height
    assert chart.y_ticks[0].label == "+4"
    only_initial = bar_chart([(50, 0, "initial", True)])
    assert not only_initial.entered[0].clipped


def test_sparkline_scales_between_min_and_max() -> None:
    points = [tuple(map(float, p.split(","))) for p in sparkline([5, 10, 5], 100, 24).split()]
    assert [x for x, _ in points] == [0.0, 50.0, 100.0]
    assert points[0][1] == points[2][1] > points[1][1]
    assert sparkline([]) == ""
