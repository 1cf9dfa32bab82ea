"""`run`: the daemon (the daemon issue fills this in)."""

from __future__ import annotations
