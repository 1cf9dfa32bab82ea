"""The `planhat` destination, in its two modes (reference/wire-formats.md sections 1 and 2).

mode `segment`: what Segment's Planhat destination sends, one identify per request.
mode `api`: bulk upsert of end users through Planhat's REST API, audience keys as custom fields.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from audience_sync.config import PlanhatConfig
from audience_sync.destinations.base import Outcome
from audience_sync.destinations.http import (
    HttpSender,
    Verdict,
    make_sender,
    outcome_of,
    outcomes_of,
    probe,
)
from audience_sync.messages import Delivery, identify
from audience_sync.ratelimit import RateLimiter

SEGMENT_PATH = "/dock/segment"
ENDUSERS_PATH = "/endusers"
# Planhat's bulk endpoints take at most 5,000 items per request.
BULK_MAX_ITEMS = 5_000
# Segment mode claims this many deliveries at a time: about a second of sending at the default
# rate, so a crash re-sends little and other processes can take the rest.
SEGMENT_MODE_CLAIM = 100
# Segment's Planhat destination routes the call to Planhat only.
INTEGRATIONS = {"All": False, "Planhat": True}
# Per-item error lists of a bulk upsert answer (200 or 206).
_ERROR_LISTS = ("createdErrors", "updatedErrors", "permissionErrors")


def segment_message(delivery: Delivery) -> dict[str, Any]:
    """Planhat reads `user_id` first and `traits.companyId` for the company: send both ids."""
    return identify(delivery, integrations=INTEGRATIONS, snake_user_id=True,
                    company_field="companyId")


class PlanhatSegmentDestination:
    """POST {base}/dock/segment, Basic `tenant_token:`, one identify per request."""

    def __init__(self, name: str, config: PlanhatConfig,
                 limiter: RateLimiter | None = None) -> None:
        assert config.tenant_token is not None
        token = config.tenant_token.get_secret_value()
        self.name = name
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
        body = json.dumps(segment_message(delivery), separators=(",", ":")).encode()
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
    """PUT {base}/endusers, Bearer API token, up to 5,000 end users per request, sequential."""

    def __init__(self, name: str, config: PlanhatConfig,
                 limiter: RateLimiter | None = None) -> None:
        assert config.api_token is not None
        token = config.api_token.get_secret_value()
        self.name = name
        self.max_batch = min(config.batch_size, BULK_MAX_ITEMS)
        self.claim_size = self.max_batch
        self.window = 1  # bulk requests one at a time (200/min)
        # Sequential by Planhat's rule for bulk requests: one connection, one request at a time.
        self.sender: HttpSender = make_sender(
            name, config.model_copy(update={"concurrency": 1}), base_url=config.url, auth=None,
            headers={"Authorization": f"Bearer {token}"}, secrets=[token],
            rate=config.effective_rate_limit, limiter=limiter)
        self.stats = self.sender.stats

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        items, owners = enduser_items(batch)
        outcomes: list[Outcome] = []
        for start in range(0, len(items), self.max_batch):
            chunk = items[start:start + self.max_batch]
            body = json.dumps(chunk, separators=(",", ":")).encode()
            reply = self.sender.call("PUT", ENDUSERS_PATH, content=body)
            chunk_ids = [d.id for item in chunk for d in owners[item["externalId"]]]
            if reply.verdict is not Verdict.OK:
                outcomes += outcomes_of(chunk_ids, reply)
                continue
            named, proven = item_errors(reply.json(), chunk, partial=reply.status == 206)
            unproven = (f"HTTP {reply.status}: Planhat reported a partial failure it did not "
                        "attribute to these end users; will retry")
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

    def check(self) -> tuple[bool, str]:
        status, text = probe(self.sender, "GET", f"{ENDUSERS_PATH}?limit=1")
        if status is None:
            return False, text
        if status in (401, 403):
            return False, f"the API token was refused ({text})"
        if 200 <= status < 300:
            return True, f"ok (API token accepted by {self.sender.shown_url})"
        return False, text

    def interrupt(self) -> None:
        self.sender.interrupt()

    def close(self) -> None:
        self.sender.close()


def enduser_items(batch: Sequence[Delivery]) -> tuple[list[dict[str, Any]],
                                                      dict[str, list[Delivery]]]:
    """One bulk item per user (several audiences merge into its `custom` fields)."""
    items: dict[str, dict[str, Any]] = {}
    owners: dict[str, list[Delivery]] = {}
    for delivery in batch:
        item = items.setdefault(delivery.user_id, {"externalId": delivery.user_id})
        if delivery.email is not None:
            item["email"] = delivery.email
        if delivery.company_id is not None:
            item["companyId"] = delivery.company_id
        item.setdefault("custom", {})[delivery.computation_key] = json.loads(delivery.value)
        owners.setdefault(delivery.user_id, []).append(delivery)
    return list(items.values()), owners


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
