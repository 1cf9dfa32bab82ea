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
