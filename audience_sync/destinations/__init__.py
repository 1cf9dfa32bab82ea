"""Destinations: one small class per kind, behind the Destination protocol."""

from __future__ import annotations

from audience_sync.config import JsonlConfig, PlanhatConfig, SegmentConfig
from audience_sync.destinations.base import Destination, Outcome, SendStats
from audience_sync.destinations.jsonl import JsonlDestination
from audience_sync.errors import AudienceSyncError
from audience_sync.messages import Style
from audience_sync.ratelimit import RateLimiter

__all__ = [
    "Destination",
    "Outcome",
    "RateLimiter",
    "SendStats",
    "check_destination",
    "make_destination",
]

DestinationConfig = PlanhatConfig | SegmentConfig | JsonlConfig


def style_of(config: DestinationConfig, space: str) -> Style:
    events = config.events
    return Style(space=space, entered=events.entered, exited=events.exited,
                 trait=events.trait)


def make_destination(name: str, config: DestinationConfig, *,
                     limiter: RateLimiter | None = None, space: str = "") -> Destination:
    """limiter: a budget shared beyond this process (ratelimit.shared_limiter); by default a
    limiter of the destination's own, at its configured rate. space: the personas space_id
    its messages carry (the config's `space:`, else the state store's)."""
    style = style_of(config, space)
    if isinstance(config, JsonlConfig):
        return JsonlDestination(name, config.path, style)
    # The HTTP destinations load httpx (a tenth of a second): only a process that uses one.
    from audience_sync.destinations.planhat import (
        PlanhatApiDestination,
        PlanhatSegmentDestination,
    )
    from audience_sync.destinations.segment import SegmentDestination

    if isinstance(config, SegmentConfig):
        return SegmentDestination(name, config, limiter, style)
    if config.mode == "api":
        return PlanhatApiDestination(name, config, limiter, style)
    return PlanhatSegmentDestination(name, config, limiter, style)


def check_destination(name: str, config: DestinationConfig) -> tuple[bool, str]:
    """Reach the destination and test its credentials where its API allows, sending nothing."""
    try:
        destination = make_destination(name, config)
    except AudienceSyncError as exc:
        return False, exc.message
    try:
        return destination.check()
    finally:
        destination.close()
