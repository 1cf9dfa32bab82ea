"""Segment's own reading of an Engage message (reference/wire-formats.md section 4)."""

from __future__ import annotations

from typing import Any


def is_membership(message: dict[str, Any]) -> bool | None:
    """Segment's rule: a message is audience membership when its computation_class is
    `audience` (or `journey_step`) and traits[computation_key] (identify) or
    properties[computation_key] (track) is a boolean; that boolean, else None."""
    persona = message.get("context", {}).get("personas", {})
    if persona.get("computation_class") not in ("audience", "journey_step"):
        return None
    key = persona.get("computation_key")
    for holder in ("traits", "properties"):
        value = message.get(holder, {}).get(key)
        if isinstance(value, bool):
            return value
    return None
