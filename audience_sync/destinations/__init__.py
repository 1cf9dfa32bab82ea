"""Destinations: one small class per kind, behind the Destination protocol."""

from __future__ import annotations

from audience_sync.config import JsonlDestination as JsonlConfig
from audience_sync.config import PlanhatDestination as PlanhatConfig
from audience_sync.config import SegmentDestination as SegmentConfig
from audience_sync.destinations.base import Destination, Outcome
from audience_sync.destinations.jsonl import JsonlDestination
from audience_sync.errors import AudienceSyncError

__all__ = ["Destination", "Outcome", "check_destination", "make_destination"]

DestinationConfig = PlanhatConfig | SegmentConfig | JsonlConfig


def make_destination(name: str, config: DestinationConfig) -> Destination:
    if isinstance(config, JsonlConfig):
        return JsonlDestination(name, config.path)
    raise AudienceSyncError(f"destination {name!r}: type {config.type!r} is not available yet")


def check_destination(name: str, config: DestinationConfig) -> tuple[bool, str]:
    try:
        destination = make_destination(name, config)
    except AudienceSyncError as exc:
        return False, exc.message
    try:
        return destination.check()
    finally:
        destination.close()
