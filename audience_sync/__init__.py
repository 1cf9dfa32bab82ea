"""audience-sync: Engage-style audience sync from your own SQL database."""

from __future__ import annotations

__version__ = "0.1.0"
