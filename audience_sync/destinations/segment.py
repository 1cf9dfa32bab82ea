"""The `segment` destination: Segment's HTTP tracking API, `POST {base}/v1/batch`.

Works with any pipeline that speaks Segment's spec (reference/wire-formats.md section 3).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _str

import httpx

from audience_sync.config import SegmentConfig
from audience_sync.destinations.base import Outcome
from audience_sync.destinations.http import (
    HttpSender,
    make_sender,
    outcomes_of,
    probe,
)
from audience_sync.messages import (
    DEFAULT_STYLE,
    Delivery,
    Style,
    identify,
    message,
    message_id,
    timestamp,
    utc_datetime,
)
from audience_sync.ratelimit import RateLimiter

BATCH_PATH = "/v1/batch"
# Segment's documented limits: 32 KB per message, 500 KB and 2,500 messages per batch.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2_500
# Room for `{"batch":[`, `],"sentAt":"..."}` around the messages.
_ENVELOPE_BYTES = 64
# The first claim, before any message size is known: small, so the first request goes out soon.
FIRST_CLAIM = 500
# Later claims aim at this share of a full batch's bytes, so one claim is one request.
_CLAIM_FILL = 0.9


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=256)
def _shared_fragment(kind: str, key: str, style: Style) -> str:
    """`"context":...,"integrations":...`: the same for every identify of one audience."""
    sample = identify(Delivery(0, key, kind, 0, "", "", "null", None, None, None, None,
                               datetime(2000, 1, 1, tzinfo=UTC)), style)
    return json.dumps({"context": sample["context"],
                       "integrations": sample["integrations"]}, separators=(",", ":"))[1:-1]


@functools.lru_cache(maxsize=256)
def _track_fragments(kind: str, key: str, value: str, style: Style) -> tuple[str, str, str]:
    """A track's constant parts, around what varies per user: (`{"type":"track","event":...,
    "userId":`, `,"properties":{...},"context":{"personas":{...},"traits":`, `,"library":...},
    "integrations":...,"messageId":"`). One run's tracks of one audience take two values."""
    sample = message(Delivery(0, key, kind, 0, "", "", value, None, None, None, None,
                              datetime(2000, 1, 1, tzinfo=UTC), 0, "track"), style)
    head = json.dumps({"type": "track", "event": sample["event"]}, separators=(",", ":"))
    middle = (f',"properties":{json.dumps(sample["properties"], separators=(",", ":"))},'
              f'"context":{{"personas":'
              f'{json.dumps(sample["context"]["personas"], separators=(",", ":"))},"traits":')
    tail = (f',"library":{json.dumps(sample["context"]["library"], separators=(",", ":"))}}},'
            f'"integrations":{json.dumps(sample["integrations"], separators=(",", ":"))},'
            '"messageId":"')
    return head[:-1] + ',"userId":', middle, tail


@functools.lru_cache(maxsize=64)
def _timestamp(observed: datetime | str) -> str:
    return timestamp(utc_datetime(observed))


@functools.lru_cache(maxsize=1024)
def _value(canonical: str) -> str:
    """The stored canonical JSON as identify() writes it (ASCII, no spaces)."""
    return json.dumps(json.loads(canonical), separators=(",", ":"))


# The contact traits in identify()'s order. An audience key named like one of them replaces
# it in place, which only the general path reproduces.
_CONTACT = frozenset(("email", "name", "title", "company_id"))


def encode(delivery: Delivery, style: Style = DEFAULT_STYLE) -> bytes:
    """The bytes of `message(delivery, style)` (the same document, key for key). An identify
    is written directly: one run's messages share everything but the user, traits and ids,
    and a json.dumps per message was most of the time spent building a batch."""
    (_, key, kind, run_id, _, user_id, value, email, name, title, company_id, observed,
     _, call, _, _) = delivery
    if key in _CONTACT or call not in ("identify", "track"):
        # Segment's API needs a user on every call: a group call without one names the account.
        return _dumps(message(delivery, style, needs_user=True))
    # Contact traits present on every message (the common case) skip the join below.
    if email is not None and name is not None and title is not None and company_id is not None:
        traits = (f'"email":{_str(email)},"name":{_str(name)},"title":{_str(title)},'
                  f'"company_id":{_str(company_id)},')
    else:
        traits = "".join((
            "" if email is None else f'"email":{_str(email)},',
            "" if name is None else f'"name":{_str(name)},',
            "" if title is None else f'"title":{_str(title)},',
            "" if company_id is None else f'"company_id":{_str(company_id)},',
        ))
    if call == "track":
        head, middle, tail = _track_fragments(kind, key, _value(value), style)
        return (f'{head}{_str(user_id)}{middle}{{{traits[:-1]}}}{tail}'
                f'{message_id(key, user_id, run_id, value, call)}",'
                f'"timestamp":"{_timestamp(observed)}"}}').encode()
    return (f'{{"type":"identify","userId":{_str(user_id)},"traits":{{{traits}'
            f'{_str(key)}:{_value(value)}}},{_shared_fragment(kind, key, style)},'
            f'"messageId":"{message_id(key, user_id, run_id, value)}",'
            f'"timestamp":"{_timestamp(observed)}"}}').encode()


def iter_batches(encoded: Iterable[tuple[int, bytes]]) -> Iterator[list[tuple[int, bytes]]]:
    """(delivery id, message) pairs in batches within Segment's count and byte limits."""
    current: list[tuple[int, bytes]] = []
    size = _ENVELOPE_BYTES
    for item in encoded:
        extra = len(item[1]) + 1
        if current and (len(current) >= MAX_BATCH_MESSAGES or size + extra > MAX_BATCH_BYTES):
            yield current
            current, size = [], _ENVELOPE_BYTES
        current.append(item)
        size += extra
    if current:
        yield current


def pack(encoded: Iterable[tuple[int, bytes]]) -> list[list[tuple[int, bytes]]]:
    return list(iter_batches(encoded))


def batch_body(messages: Sequence[bytes], sent_at: datetime) -> bytes:
    return (b'{"batch":[' + b",".join(messages) + b'],"sentAt":"'
            + timestamp(sent_at).encode() + b'"}')


class SegmentDestination:
    """Batches posted concurrently (`concurrency`), each within Segment's limits.

    The drain keeps `window` claims on the wire, each sized (`claim_size`, learned from the
    sizes of the messages built so far) to fill about one batch: every answered batch commits
    its outcomes while the others keep the endpoint busy.
    """

    def __init__(self, name: str, config: SegmentConfig,
                 limiter: RateLimiter | None = None, style: Style = DEFAULT_STYLE) -> None:
        key = config.write_key.get_secret_value()
        self.name = name
        self.style = style
        self.max_batch = MAX_BATCH_MESSAGES
        self.window = config.concurrency
        self.claim_size = FIRST_CLAIM
        self.sender: HttpSender = make_sender(
            name, config, base_url=config.url, auth=httpx.BasicAuth(key, ""), headers={},
            secrets=[key], rate=config.rate_limit, limiter=limiter)
        self.stats = self.sender.stats
        self._pool = ThreadPoolExecutor(config.concurrency,
                                        thread_name_prefix=f"segment-{name}")

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        """Post a claim as batches within Segment's limits; a message over 32 KB fails alone.
        Learns `claim_size` from the messages' sizes."""
        refused: list[Outcome] = []
        fitting: list[tuple[int, bytes]] = []
        for delivery in batch:
            encoded = encode(delivery, self.style)
            if len(encoded) <= MAX_MESSAGE_BYTES:
                fitting.append((delivery.id, encoded))
                continue
            refused.append(Outcome(
                delivery.id, ok=False, permanent=True, attempts=0,
                error=f"message is {len(encoded):,} bytes; Segment accepts at most "
                      f"{MAX_MESSAGE_BYTES:,} bytes per message (not sent)"))
        if not fitting:
            return refused
        average = sum(len(m) + 1 for _, m in fitting) / len(fitting)
        self.claim_size = max(1, min(MAX_BATCH_MESSAGES, int(
            (MAX_BATCH_BYTES - _ENVELOPE_BYTES) * _CLAIM_FILL / average)))
        chunks = pack(fitting)
        if len(chunks) == 1:  # the usual claim: one batch, posted from this thread
            return refused + self._post(chunks[0])
        posts = [self._pool.submit(self._post, chunk) for chunk in chunks]
        return refused + [outcome for post in posts for outcome in post.result()]

    def _post(self, batch: list[tuple[int, bytes]]) -> list[Outcome]:
        body = batch_body([m for _, m in batch], datetime.now(UTC))
        reply = self.sender.call("POST", BATCH_PATH, content=body)
        return outcomes_of([delivery_id for delivery_id, _ in batch], reply)

    def check(self) -> tuple[bool, str]:
        # An empty batch reaches the endpoint and its auth check without sending an identify.
        status, text = probe(self.sender, "POST", BATCH_PATH,
                             content=batch_body([], datetime.now(UTC)))
        if status is None:
            return False, text
        if status in (401, 403):
            return False, f"the write key was refused ({text})"
        if 200 <= status < 300:
            return True, (f"ok (reached {self.sender.shown_url}; Segment itself accepts "
                          "any write key, so only a refusal proves a bad one)")
        return False, text

    def interrupt(self) -> None:
        self.sender.interrupt()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sender.close()
