"""`deliveries` and `retry` (the delivery issue fills these in)."""

from __future__ import annotations
