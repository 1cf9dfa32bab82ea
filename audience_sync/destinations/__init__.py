"""Destinations: one small class per kind, behind the Destination protocol."""

from __future__ import annotations

from collections.abc import Sequence

from audience_sync.config import JsonlConfig, PlanhatConfig, SegmentConfig
from audience_sync.destinations.base import Destination, FieldLedger, Outcome, SendStats
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
                     limiter: RateLimiter | None = None, space: str = "",
                     fields: FieldLedger | None = None) -> Destination:
    """limiter: a budget shared beyond this process (ratelimit.shared_limiter); by default a
    limiter of the destination's own, at its configured rate. space: the personas space_id
    its messages carry (the config's `space:`, else the state store's). fields: the custom
    fields the destination is known to have, shared by every process (Planhat mode api)."""
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
        return PlanhatApiDestination(name, config, limiter, style, fields)
    return PlanhatSegmentDestination(name, config, limiter, style)


def check_destination(name: str, config: DestinationConfig,
                      computations: Sequence[tuple[str, str, str]] = ()) -> tuple[bool, str]:
    """Reach the destination and test its credentials where its API allows, sending nothing.
    computations: (key, kind, level) of what goes there; Planhat mode api checks their fields
    (a company's for an account computation it receives as companies, else an end user's)."""
    try:
        destination = make_destination(name, config)
    except AudienceSyncError as exc:
        return False, exc.message
    try:
        ok, said = destination.check()
        check_fields = getattr(destination, "check_fields", None)
        if ok and check_fields is not None and computations:
            from audience_sync.destinations.planhat import field_parent, field_type

            call = config.account_call()
            ok, fields = check_fields({(field_parent(level, call), key): field_type(kind, [])
                                       for key, kind, level in computations})
            said = f"{said}; {fields}"
        return ok, said
    finally:
        destination.close()
