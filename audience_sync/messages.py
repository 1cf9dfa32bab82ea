"""Segment-spec identify messages, built from an outbox row: a pure function of its inputs."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from hashlib import sha256 as _sha256
from typing import Any, NamedTuple

from audience_sync import __version__

# The contact traits an audience query may select beside user_id; they travel with its calls.
CONTACT_TRAITS = ("email", "name", "title", "company_id")
# The longest user id stored and sent; longer ones are counted and skipped.
USER_ID_MAX = 255

LIBRARY = {"name": "audience-sync", "version": __version__}
# Segment's limit on messageId; ours are far shorter.
MESSAGE_ID_MAX = 100


class Delivery(NamedTuple):
    """One outbox row with what is needed to build its message (a tuple: cheap to make by the
    ten thousand when a large drain loads its outbox)."""

    id: int
    computation_key: str
    computation_kind: str  # audience | trait
    run_id: int
    destination: str
    user_id: str
    value: str  # canonical JSON
    email: str | None
    name: str | None
    title: str | None
    company_id: str | None
    # When the change was observed, as the driver returned it (SQLite: ISO text): converted
    # on use, once per distinct value, since a run's deliveries share one.
    observed: datetime | str
    attempts: int = 0

    @property
    def observed_at(self) -> datetime:
        return utc_datetime(self.observed)

    @property
    def message_id(self) -> str:
        return message_id(self.computation_key, self.user_id, self.run_id, self.value)


def message_id(key: str, user_id: str, run_id: int, value: str) -> str:
    """Deterministic per (audience, user, run, value): a retried delivery keeps its id."""
    return "as-" + _sha256(f"{key}\x1f{user_id}\x1f{run_id}\x1f{value}".encode()).hexdigest()[:40]


@functools.lru_cache(maxsize=256)
def utc_datetime(value: datetime | str) -> datetime:
    """A stored timestamp (a datetime, or ISO text), timezone-aware UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def computation_id(kind: str, key: str) -> str:
    return f"{'aud' if kind == 'audience' else 'trait'}_{key}"


def timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def contact_traits(delivery: Delivery, company_field: str = "company_id") -> dict[str, Any]:
    traits: dict[str, Any] = {}
    if delivery.email is not None:
        traits["email"] = delivery.email
    if delivery.name is not None:
        traits["name"] = delivery.name
    if delivery.title is not None:
        traits["title"] = delivery.title
    if delivery.company_id is not None:
        traits[company_field] = delivery.company_id
    return traits


def identify(delivery: Delivery, *, integrations: dict[str, bool] | None = None,
             snake_user_id: bool = False, company_field: str = "company_id") -> dict[str, Any]:
    """The identify call for one delivery (DESIGN.md section 3)."""
    traits = contact_traits(delivery, company_field)
    traits[delivery.computation_key] = json.loads(delivery.value)
    message: dict[str, Any] = {
        "type": "identify",
        "userId": delivery.user_id,
    }
    if snake_user_id:
        message["user_id"] = delivery.user_id
    message.update({
        "traits": traits,
        "context": {
            "personas": {
                "computation_class": delivery.computation_kind,
                "computation_key": delivery.computation_key,
                "computation_id": computation_id(delivery.computation_kind,
                                                 delivery.computation_key),
            },
            "library": dict(LIBRARY),
        },
        "integrations": dict(integrations or {"All": True}),
        "messageId": delivery.message_id,
        "timestamp": timestamp(delivery.observed_at),
    })
    return message
