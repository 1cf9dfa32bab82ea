"""The one clock type and the system clock. Logic takes a clock (or `at=`) so tests freeze it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Timezone-aware UTC now (freezegun patches what this reads)."""
    return datetime.now(UTC)
