"""The one clock type and the system clock. Logic takes a clock (or `at=`) so tests freeze it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Timezone-aware UTC now (freezegun patches what this reads)."""
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """ISO-8601 in UTC with a Z, as every output prints times."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def duration(seconds: float) -> str:
    """`45 s`, `12 min`, `1 h 48 min`, `2 d 3 h`: an ETA or an age, to the unit that matters."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes = whole // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def relative(value: datetime, now: datetime) -> str:
    """`12 min ago`, `in 1 h 48 min`, `now` (within a second)."""
    seconds = (value - now).total_seconds()
    if abs(seconds) < 1:
        return "now"
    return f"in {duration(seconds)}" if seconds > 0 else f"{duration(-seconds)} ago"


def table_time(value: datetime | None, now: datetime) -> str:
    """The one timestamp style of tables: UTC to the second, and how far from now
    (`2026-11-30 15:02:51 (12 min ago)`); `-` for none."""
    if value is None:
        return "-"
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} ({relative(value, now)})"
