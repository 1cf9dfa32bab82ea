"""Segment-spec identify and track messages, built from an outbox row: a pure function of its
inputs (the row, and the destination's `Style`: event names, personas space)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
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
# The calls a destination may be sent (`send:`), in the order a change yields them.
CALLS = ("identify", "track")
# The call of an account's own row (an account audience's group call, or its Planhat company).
GROUP = "group"
# Engage's event names (renamable per destination with `events:`).
ENTERED = "Audience Entered"
EXITED = "Audience Exited"
TRAIT = "Trait Computed"


@dataclass(frozen=True)
class Style:
    """What a destination adds to every message: its event names and the personas space."""

    space: str = ""
    entered: str = ENTERED
    exited: str = EXITED
    trait: str = TRAIT


DEFAULT_STYLE = Style()


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
    call: str = "identify"  # identify | track | group
    # A group call: the user it names (the account definition's user_id), if any, and the
    # account traits it carries (the definition's other columns, canonical JSON).
    user_ref: str | None = None
    traits: str | None = None

    @property
    def observed_at(self) -> datetime:
        return utc_datetime(self.observed)

    @property
    def message_id(self) -> str:
        return message_id(self.computation_key, self.user_id, self.run_id, self.value,
                          self.call)


def message_id(key: str, user_id: str, run_id: int, value: str, call: str = "identify") -> str:
    """Deterministic per (audience, user, run, value, call): a retried delivery keeps its id,
    and the identify and the track of one change have different ones. (An identify's id is
    what it was before track calls existed.)"""
    text = f"{key}\x1f{user_id}\x1f{run_id}\x1f{value}"
    if call != "identify":
        text += f"\x1f{call}"
    return "as-" + _sha256(text.encode()).hexdigest()[:40]


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


def personas(kind: str, key: str, space: str) -> dict[str, str]:
    """`context.personas` as Engage sends it; the namespace is the space's."""
    return {
        "computation_class": kind,
        "computation_key": key,
        "computation_id": computation_id(kind, key),
        "space_id": space,
        "namespace": f"spa_{space}",
    }


def message(delivery: Delivery, style: Style = DEFAULT_STYLE, *,
            integrations: dict[str, bool] | None = None, snake_user_id: bool = False,
            company_field: str = "company_id", needs_user: bool = False) -> dict[str, Any]:
    """The call an outbox row delivers: its identify, its track or (an account's row) its
    group call. needs_user: a group call must name someone (Segment's API): one without a
    user_ref names the account as its anonymousId."""
    if delivery.call == GROUP:
        return group(delivery, style, integrations=integrations, needs_user=needs_user)
    build = track if delivery.call == "track" else identify
    return build(delivery, style, integrations=integrations, snake_user_id=snake_user_id,
                 company_field=company_field)


def identify(delivery: Delivery, style: Style = DEFAULT_STYLE, *,
             integrations: dict[str, bool] | None = None, snake_user_id: bool = False,
             company_field: str = "company_id") -> dict[str, Any]:
    """The identify call for one delivery (DESIGN.md section 3)."""
    traits = contact_traits(delivery, company_field)
    traits[delivery.computation_key] = json.loads(delivery.value)
    return _message(delivery, style, {"type": "identify"}, {"traits": traits}, {},
                    integrations, snake_user_id)


def event_name(delivery: Delivery, style: Style = DEFAULT_STYLE) -> str:
    if delivery.computation_kind != "audience":
        return style.trait
    return style.exited if delivery.value == "false" else style.entered


def track(delivery: Delivery, style: Style = DEFAULT_STYLE, *,
          integrations: dict[str, bool] | None = None, snake_user_id: bool = False,
          company_field: str = "company_id") -> dict[str, Any]:
    """Engage's track call: `Audience Entered`/`Audience Exited` with
    `{audience_key: KEY, KEY: bool}`, or `Trait Computed` with `{trait_key: KEY, KEY: VALUE}`;
    the contact traits go in `context.traits`."""
    key = delivery.computation_key
    name = "audience_key" if delivery.computation_kind == "audience" else "trait_key"
    properties: dict[str, Any] = {name: key}
    properties[key] = json.loads(delivery.value)
    return _message(delivery, style, {"type": "track", "event": event_name(delivery, style)},
                    {"properties": properties},
                    {"traits": contact_traits(delivery, company_field)},
                    integrations, snake_user_id)


def group(delivery: Delivery, style: Style = DEFAULT_STYLE, *,
          integrations: dict[str, bool] | None = None,
          needs_user: bool = False) -> dict[str, Any]:
    """Engage's group call for one account of an account audience (or trait): `groupId`, and
    `traits` holding the account traits and `<key>: true|false` (or the value)."""
    traits = contact_traits(delivery)
    if delivery.traits is not None:
        traits.update(json.loads(delivery.traits))
    traits[delivery.computation_key] = json.loads(delivery.value)
    head: dict[str, Any] = {"type": "group", "groupId": delivery.user_id}
    if delivery.user_ref is not None:
        head["userId"] = delivery.user_ref
    elif needs_user:
        head["anonymousId"] = delivery.user_id
    return _message(delivery, style, head, {"traits": traits}, {}, integrations, False)


def _message(delivery: Delivery, style: Style, head: dict[str, Any], body: dict[str, Any],
             context: dict[str, Any], integrations: dict[str, bool] | None,
             snake_user_id: bool) -> dict[str, Any]:
    message: dict[str, Any] = head if head["type"] == GROUP else {**head,
                                                                 "userId": delivery.user_id}
    if snake_user_id:
        message["user_id"] = delivery.user_id
    message.update(body)
    message.update({
        "context": {
            "personas": personas(delivery.computation_kind, delivery.computation_key,
                                 style.space),
            **context,
            "library": dict(LIBRARY),
        },
        "integrations": dict(integrations or {"All": True}),
        "messageId": delivery.message_id,
        "timestamp": timestamp(delivery.observed_at),
    })
    return message

