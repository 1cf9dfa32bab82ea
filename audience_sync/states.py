"""The states a run, a delivery and an audience's initial sync go through, as types.

StrEnum members are their stored text (`DeliveryStatus.PENDING == "pending"`), so they go into
SQL and JSON as they are, and rows read back compare equal to them. Pure: imports nothing.
"""

from __future__ import annotations

from enum import StrEnum


class RunKind(StrEnum):
    INITIAL = "initial"  # the audience's first applied run: everyone enters
    INCREMENTAL = "incremental"  # only what changed since the last run
    RESYNC = "resync"  # every current member sent again


class RunStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a source error: nothing changed
    HELD = "held"  # the removal guard held it: nothing changed until --force
    PLANNED = "planned"  # a dry run's result; never stored


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # to send (now, or at next_attempt_at)
    SENT = "sent"  # acknowledged by the destination
    FAILED = "failed"  # refused for good, until `retry`
    SUPERSEDED = "superseded"  # a newer change for the same user replaced it


class InitialState(StrEnum):
    PENDING = "pending"  # never run
    DELIVERING = "delivering"  # initial run committed, deliveries outstanding
    COMPLETE = "complete"
