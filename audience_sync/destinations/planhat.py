"""The `planhat` destination, in its two modes (reference/wire-formats.md sections 1 and 2).

mode `segment`: what Segment's Planhat destination sends, one identify or track per request.
mode `api`: bulk upsert of end users (and, for account audiences, of companies) through
Planhat's REST API, audience keys as custom fields of each; track calls become user activities
through the bulk activity endpoint of the analytics host.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import httpx

from audience_sync.config import PlanhatConfig, RateLimit
from audience_sync.destinations.base import FieldLedger, MemoryFields, Outcome
from audience_sync.destinations.http import (
    HttpSender,
    Verdict,
    make_sender,
    outcome_of,
    outcomes_of,
    probe,
)
from audience_sync.messages import (
    DEFAULT_STYLE,
    GROUP,
    Delivery,
    Style,
    event_name,
    message,
    timestamp,
)
from audience_sync.ratelimit import RateLimiter

SEGMENT_PATH = "/dock/segment"
ENDUSERS_PATH = "/endusers"
COMPANIES_PATH = "/companies"
CUSTOMFIELDS_PATH = "/customfields"
# A custom field's parent: the object whose field it is.
ENDUSER = "EndUser"
COMPANY = "Company"
# User activities: the tenant token in the path, no other auth, on the analytics host.
ACTIVITY_BULK_PATH = "/analytics/bulk/{token}"
ANALYTICS_URL = "https://analytics.planhat.com"
# Planhat's bulk endpoints take at most 5,000 items per request.
BULK_MAX_ITEMS = 5_000
# Segment mode claims this many deliveries at a time: about a second of sending at the default
# rate, so a crash re-sends little and other processes can take the rest.
SEGMENT_MODE_CLAIM = 100
# The bulk activity endpoint's items per request (UNCONFIRMED: Planhat documents 5,000 for
# its bulk upserts; the same bound here keeps a request well under its 32 MB body limit).
ACTIVITY_BULK_MAX = 5_000
# The analytics host is Planhat's high-volume tracking host, outside the REST quota: one
# request at a time at this rate stays far below its 150/s hard limit.
ACTIVITY_RATE = RateLimit(50, 1)
# Segment's Planhat destination routes the call to Planhat only.
INTEGRATIONS = {"All": False, "Planhat": True}
# Per-item error lists of a bulk upsert answer (200 or 206).
_ERROR_LISTS = ("createdErrors", "updatedErrors", "permissionErrors")


def segment_message(delivery: Delivery, style: Style = DEFAULT_STYLE) -> dict[str, Any]:
    """Planhat reads `user_id` first and `traits.companyId` for the company: send both ids."""
    return message(delivery, style, integrations=INTEGRATIONS, snake_user_id=True,
                   company_field="companyId")


def activity(delivery: Delivery, style: Style = DEFAULT_STYLE) -> dict[str, Any]:
    """A track call as a Planhat user activity: the event name as its action, the track's
    properties as its info."""
    key = delivery.computation_key
    name = "audience_key" if delivery.computation_kind == "audience" else "trait_key"
    item: dict[str, Any] = {"externalId": delivery.user_id,
                            "action": event_name(delivery, style),
                            "info": {name: key, key: json.loads(delivery.value)},
                            "date": timestamp(delivery.observed_at)}
    if delivery.email is not None:
        item["email"] = delivery.email
    if delivery.company_id is not None:
        item["companyExternalId"] = delivery.company_id
    return item


class PlanhatSegmentDestination:
    """POST {base}/dock/segment, Basic `tenant_token:`, one identify or track per request."""

    def __init__(self, name: str, config: PlanhatConfig,
                 limiter: RateLimiter | None = None, style: Style = DEFAULT_STYLE) -> None:
        assert config.tenant_token is not None
        token = config.tenant_token.get_secret_value()
        self.name = name
        self.style = style
        self.max_batch = min(config.batch_size, SEGMENT_MODE_CLAIM)
        self.claim_size = self.max_batch
        self.window = 1  # its requests go `concurrency` at a time within one claim
        self.sender: HttpSender = make_sender(
            name, config, base_url=config.url, auth=httpx.BasicAuth(token, ""), headers={},
            secrets=[token], rate=config.effective_rate_limit, limiter=limiter)
        self.stats = self.sender.stats
        self._pool = ThreadPoolExecutor(config.concurrency,
                                        thread_name_prefix=f"planhat-{name}")

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        return list(self._pool.map(self._send_one, batch))

    def _send_one(self, delivery: Delivery) -> Outcome:
        body = json.dumps(segment_message(delivery, self.style), separators=(",", ":")).encode()
        return outcome_of(delivery.id, self.sender.call("POST", SEGMENT_PATH, content=body))

    def check(self) -> tuple[bool, str]:
        status, text = probe(self.sender, "GET", SEGMENT_PATH)
        if status is None:
            return False, text
        return True, (f"reachable at {self.sender.shown_url}; Planhat offers no way to "
                      "verify the tenant token without sending an identify")

    def interrupt(self) -> None:
        self.sender.interrupt()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sender.close()


class PlanhatApiDestination:
    """PUT {base}/endusers, Bearer API token, up to 5,000 end users per request, sequential;
    an account's (group) rows PUT {base}/companies the same way; track rows as activities,
    POST {analytics}/analytics/bulk/{tenant token}."""

    def __init__(self, name: str, config: PlanhatConfig,
                 limiter: RateLimiter | None = None, style: Style = DEFAULT_STYLE,
                 fields: FieldLedger | None = None) -> None:
        assert config.api_token is not None
        token = config.api_token.get_secret_value()
        self.name = name
        self.style = style
        self.create_fields = config.create_fields
        self.fields: FieldLedger = fields if fields is not None else MemoryFields()
        # (parent, key) whose field this process saw exist: no lookup before its next upsert.
        self._ready: set[tuple[str, str]] = set()
        self.max_batch = min(config.batch_size, BULK_MAX_ITEMS)
        self.claim_size = self.max_batch
        self.window = 1  # bulk requests one at a time (200/min)
        # Sequential by Planhat's rule for bulk requests: one connection, one request at a time.
        self.sender: HttpSender = make_sender(
            name, config.model_copy(update={"concurrency": 1}), base_url=config.url, auth=None,
            headers={"Authorization": f"Bearer {token}"}, secrets=[token],
            rate=config.effective_rate_limit, limiter=limiter)
        self.stats = self.sender.stats
        # The activity endpoint is not counted in the REST quota: a sender of its own, whose
        # tenant token (in the path) is redacted like any secret.
        self.activities: HttpSender | None = None
        self._activity_path = ""
        if config.tenant_token is not None:
            tenant = config.tenant_token.get_secret_value()
            self._activity_path = ACTIVITY_BULK_PATH.format(token=tenant)
            self.activities = make_sender(
                name, config.model_copy(update={"concurrency": 1}),
                base_url=config.analytics_url, auth=None, headers={}, secrets=[tenant, token],
                rate=ACTIVITY_RATE)
            self.activities.stats = self.stats

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        tracks = [d for d in batch if d.call == "track"]
        companies = [d for d in batch if d.call == GROUP]
        endusers = [d for d in batch if d.call not in ("track", GROUP)]
        outcomes = self._send_activities(tracks) if tracks else []
        if companies or endusers:
            # One look at the custom fields for both parents of the claim.
            missing = self.ensure_fields({**field_types(endusers, ENDUSER),
                                          **field_types(companies, COMPANY)})
            outcomes += self._send_bulk(ENDUSERS, endusers, missing)
            outcomes += self._send_bulk(COMPANIES, companies, missing)
        return outcomes

    def _send_activities(self, batch: Sequence[Delivery]) -> list[Outcome]:
        if self.activities is None:
            # Config validation requires the tenant token with track: only a stale row.
            return [Outcome(d.id, ok=False, permanent=True, attempts=0,
                            error="track needs tenant_token in mode api (not sent)")
                    for d in batch]
        outcomes: list[Outcome] = []
        for start in range(0, len(batch), ACTIVITY_BULK_MAX):
            chunk = batch[start:start + ACTIVITY_BULK_MAX]
            body = json.dumps([activity(d, self.style) for d in chunk],
                              separators=(",", ":")).encode()
            reply = self.activities.call("POST", self._activity_path, content=body)
            outcomes += outcomes_of([d.id for d in chunk], reply)
        return outcomes

    def _send_bulk(self, target: Bulk, batch: Sequence[Delivery],
                   missing: dict[tuple[str, str], str]) -> list[Outcome]:
        """Bulk upserts of one kind of object, `max_batch` items per request, one at a time;
        the deliveries of a key whose field is missing wait (with why)."""
        outcomes = [Outcome(d.id, ok=False, error=missing[target.parent, d.computation_key],
                            attempts=0)
                    for d in batch if (target.parent, d.computation_key) in missing]
        if outcomes:
            batch = [d for d in batch if (target.parent, d.computation_key) not in missing]
        items, owners = bulk_items(batch, target.head)
        for start in range(0, len(items), self.max_batch):
            chunk = items[start:start + self.max_batch]
            body = json.dumps(chunk, separators=(",", ":")).encode()
            reply = self.sender.call("PUT", target.path, content=body)
            chunk_ids = [d.id for item in chunk for d in owners[item["externalId"]]]
            if reply.verdict is not Verdict.OK:
                outcomes += outcomes_of(chunk_ids, reply)
                continue
            named, proven = item_errors(reply.json(), chunk, partial=reply.status == 206)
            unproven = (f"HTTP {reply.status}: Planhat reported a partial failure it did not "
                        f"attribute to these {target.noun}; will retry")
            for item in chunk:
                error = named.get(item["externalId"])
                for delivery in owners[item["externalId"]]:
                    if error is not None:
                        outcomes.append(Outcome(
                            delivery.id, ok=False, permanent=True, attempts=reply.attempts,
                            error=self.sender.line(f"HTTP {reply.status}: {error}")))
                    elif proven:
                        outcomes.append(Outcome(delivery.id, ok=True, attempts=reply.attempts))
                    else:
                        # Not named, and the answer does not prove it was accepted: try again.
                        outcomes.append(Outcome(delivery.id, ok=False, error=unproven,
                                                attempts=reply.attempts))
        return outcomes

    def ensure_fields(self, wanted: dict[tuple[str, str], str]) -> dict[tuple[str, str], str]:
        """Make sure a custom field exists for each (parent, key) (-> type), creating the
        missing ones unless create_fields is off; (parent, key) -> why its deliveries wait."""
        wanted = {k: v for k, v in wanted.items() if k not in self._ready}
        if not wanted:
            return {}
        known = {(parent, name) for parent in {p for p, _ in wanted}
                 for name in self.fields.known(parent)}
        self._ready |= known & set(wanted)
        wanted = {k: v for k, v in wanted.items() if k not in known}
        if not wanted:
            return {}
        existing, error = self._list_fields()
        if error is not None:
            return {field: error for field in wanted}
        for parent, key in wanted.keys() & existing:
            self.fields.remember(parent, key, existing[parent, key])
            self._ready.add((parent, key))
        waiting: dict[tuple[str, str], str] = {}
        for (parent, key), kind in wanted.items():
            if (parent, key) in existing:
                continue
            if not self.create_fields:
                waiting[parent, key] = (
                    f"Planhat has no {_NOUNS[parent]} custom field {key!r} and create_fields "
                    "is false: create it in Planhat (or allow create_fields); the deliveries "
                    "wait")
                continue
            problem = self._create_field(parent, key, kind)
            if problem is None:
                self._ready.add((parent, key))
            else:
                waiting[parent, key] = problem
        return waiting

    def _list_fields(self) -> tuple[dict[tuple[str, str], str], str | None]:
        """The end-user and company custom fields on Planhat ((parent, name) -> type), or why
        they are unknown."""
        reply = self.sender.call("GET", CUSTOMFIELDS_PATH)
        if reply.verdict is not Verdict.OK:
            return {}, f"cannot list Planhat's custom fields: {reply.error}"
        document = reply.json()
        if not isinstance(document, list):
            return {}, "cannot list Planhat's custom fields: the answer is not a list"
        return {(str(f["parent"]), str(f["name"])): str(f.get("type", "")) for f in document
                if isinstance(f, dict) and f.get("parent") in _NOUNS
                and isinstance(f.get("name"), str)}, None

    def _create_field(self, parent: str, key: str, kind: str) -> str | None:
        body = json.dumps({"parent": parent, "name": key, "type": kind}).encode()
        # The request slot is taken before the ledger's transaction: a budget shared in the
        # state store writes there too, and SQLite has one writer.
        if not self.sender.limiter.acquire(self.sender.halted):
            return f"stopped before creating Planhat {_NOUNS[parent]} custom field {key!r}"
        try:
            with self.fields.creating(parent, key, kind) as mine:
                if not mine:
                    return None  # another process created it (or found it)
                reply = self.sender.call("POST", CUSTOMFIELDS_PATH, content=body,
                                         rate_limited=False)
                if reply.verdict is not Verdict.OK:
                    raise _NotCreated(f"cannot create Planhat {_NOUNS[parent]} custom field "
                                      f"{key!r}: {reply.error}")
        except _NotCreated as exc:
            return str(exc)
        return None

    def check(self) -> tuple[bool, str]:
        status, text = probe(self.sender, "GET", f"{ENDUSERS_PATH}?limit=1")
        if status is None:
            return False, text
        if status in (401, 403):
            return False, f"the API token was refused ({text})"
        if 200 <= status < 300:
            return True, f"ok (API token accepted by {self.sender.shown_url})"
        return False, text

    def check_fields(self, wanted: dict[tuple[str, str], str]) -> tuple[bool, str]:
        """check: the custom fields the configured keys need ((parent, key) -> type); none is
        created here (the first upsert creates them, once)."""
        existing, error = self._list_fields()
        if error is not None:
            return False, error
        missing = sorted(set(wanted) - set(existing), key=lambda f: (f[1], f[0]))
        if not missing:
            return True, f"custom fields: all {len(wanted)} exist"
        names = ", ".join(f"{key} ({_NOUNS[parent]})" for parent, key in missing)
        if self.create_fields:
            return True, f"custom fields to create at the first upsert: {names}"
        return False, (f"missing custom fields {names} and create_fields is false: "
                       "create them in Planhat; their deliveries wait until then")

    def interrupt(self) -> None:
        self.sender.interrupt()
        if self.activities is not None:
            self.activities.interrupt()

    def close(self) -> None:
        self.sender.close()
        if self.activities is not None:
            self.activities.close()


class _NotCreated(Exception):
    """A custom field's creation failed: its row in the ledger is rolled back."""


def field_type(kind: str, values: Sequence[object]) -> str:
    """checkbox for an audience; number for a trait whose values seen are all numbers, else
    text."""
    if kind == "audience":
        return "checkbox"
    seen = [v for v in values if v is not None]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in seen)
    return "number" if seen and numeric else "text"


def field_types(batch: Sequence[Delivery], parent: str) -> dict[tuple[str, str], str]:
    """(parent, key) -> the type of the custom field each key of the batch needs."""
    values: dict[tuple[str, str], list[object]] = {}
    for delivery in batch:
        values.setdefault((delivery.computation_key, delivery.computation_kind), []).append(
            json.loads(delivery.value))
    return {(parent, key): field_type(kind, seen) for (key, kind), seen in values.items()}


def field_parent(level: str, account_call: str) -> str:
    """The object whose custom field a computation sets: a company for an account computation
    sent as companies, else the end user (fanned out to the account's users, or a user's)."""
    return COMPANY if level == "account" and account_call == "companies" else ENDUSER


def _enduser_head(delivery: Delivery) -> dict[str, Any]:
    head: dict[str, Any] = {"externalId": delivery.user_id}
    if delivery.email is not None:
        head["email"] = delivery.email
    if delivery.company_id is not None:
        head["companyId"] = delivery.company_id
    return head


def _company_head(delivery: Delivery) -> dict[str, Any]:
    """An account's row: its id is the company's externalId, its name the company's."""
    head: dict[str, Any] = {"externalId": delivery.user_id}
    if delivery.name is not None:
        head["name"] = delivery.name
    return head


class Bulk(NamedTuple):
    """One of Planhat's bulk upserts: where it goes, its custom fields' parent, what its items
    are called in errors, and an item's fields but `custom` from a delivery."""

    path: str
    parent: str
    noun: str
    head: Callable[[Delivery], dict[str, Any]]


ENDUSERS = Bulk(ENDUSERS_PATH, ENDUSER, "end users", _enduser_head)
COMPANIES = Bulk(COMPANIES_PATH, COMPANY, "companies", _company_head)
# How errors and check name a custom field's parent.
_NOUNS = {ENDUSER: "end-user", COMPANY: "company"}


def bulk_items(batch: Sequence[Delivery], head: Callable[[Delivery], dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], dict[str, list[Delivery]]]:
    """One bulk item per externalId (several audiences merge into its `custom` fields), and
    the deliveries each item carries."""
    items: dict[str, dict[str, Any]] = {}
    owners: dict[str, list[Delivery]] = {}
    for delivery in batch:
        item = items.get(delivery.user_id)
        if item is None:
            item = items[delivery.user_id] = head(delivery)
        else:
            item.update(head(delivery))
        item.setdefault("custom", {})[delivery.computation_key] = json.loads(delivery.value)
        owners.setdefault(delivery.user_id, []).append(delivery)
    return list(items.values()), owners


def enduser_items(batch: Sequence[Delivery]) -> tuple[list[dict[str, Any]],
                                                      dict[str, list[Delivery]]]:
    """One bulk item per user (several audiences merge into its `custom` fields)."""
    return bulk_items(batch, _enduser_head)


def company_items(batch: Sequence[Delivery]) -> tuple[list[dict[str, Any]],
                                                      dict[str, list[Delivery]]]:
    """One bulk item per company (several account audiences merge into its `custom`)."""
    return bulk_items(batch, _company_head)


def item_errors(document: object, items: Sequence[dict[str, Any]], *,
                partial: bool = False) -> tuple[dict[str, str], bool]:
    """(externalId -> reason for the items of the request a bulk answer names as failed,
    whether it proves every other item was accepted).

    Entries may name the item (`externalId`, or the item itself under `item`) or its position
    (`index`). The rest is proven accepted only when every error entry was attributed to an
    item of the request and, for a 206 (partial), at least one was: an HTML body, `{}`, empty
    error lists or an unknown externalId on a 206 prove nothing.
    """
    if not isinstance(document, dict):
        return {}, not partial
    requested = {str(item["externalId"]) for item in items}
    found: dict[str, str] = {}
    attributed = True
    for key in _ERROR_LISTS:
        entries = document.get(key) or []
        if not isinstance(entries, list):
            attributed = False
            continue
        for entry in entries:
            external_id = _entry_id(entry, items)
            if external_id is None or external_id not in requested:
                attributed = False
                continue
            found[external_id] = _entry_reason(entry, key)
    return found, attributed and (bool(found) or not partial)


def _entry_id(entry: object, items: Sequence[dict[str, Any]]) -> str | None:
    if not isinstance(entry, dict):
        return None
    for candidate in (entry, entry.get("item"), entry.get("data")):
        if isinstance(candidate, dict) and isinstance(candidate.get("externalId"), str):
            return str(candidate["externalId"])
    index = entry.get("index")
    if isinstance(index, int) and 0 <= index < len(items):
        return str(items[index]["externalId"])
    return None


def _entry_reason(entry: object, key: str) -> str:
    if isinstance(entry, dict):
        for field in ("error", "message", "reason"):
            value = entry.get(field)
            if isinstance(value, str) and value:
                return value  # whole: the caller redacts, then shortens
    return f"listed in {key}"
