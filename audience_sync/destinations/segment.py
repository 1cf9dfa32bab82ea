"""The `segment` destination: Segment's HTTP tracking API, `POST {base}/v1/batch`.

Works with any pipeline that speaks Segment's spec (reference/wire-formats.md section 3).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx

from audience_sync.config import SegmentDestination as SegmentConfig
from audience_sync.destinations.base import Outcome
from audience_sync.destinations.http import HttpSender, make_sender, outcome_of, probe
from audience_sync.messages import Delivery, identify, timestamp

BATCH_PATH = "/v1/batch"
# Segment's documented limits: 32 KB per message, 500 KB and 2,500 messages per batch.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2_500
# Room for `{"batch":[`, `],"sentAt":"..."}` around the messages.
_ENVELOPE_BYTES = 64


def encode(delivery: Delivery) -> bytes:
    return json.dumps(identify(delivery), separators=(",", ":")).encode()


def pack(encoded: Sequence[tuple[int, bytes]]) -> list[list[tuple[int, bytes]]]:
    """Split (delivery id, message) pairs into batches within Segment's count and byte limits."""
    batches: list[list[tuple[int, bytes]]] = []
    current: list[tuple[int, bytes]] = []
    size = _ENVELOPE_BYTES
    for item in encoded:
        extra = len(item[1]) + 1
        if current and (len(current) >= MAX_BATCH_MESSAGES or size + extra > MAX_BATCH_BYTES):
            batches.append(current)
            current, size = [], _ENVELOPE_BYTES
        current.append(item)
        size += extra
    if current:
        batches.append(current)
    return batches


def batch_body(messages: Sequence[bytes], sent_at: datetime) -> bytes:
    return (b'{"batch":[' + b",".join(messages) + b'],"sentAt":"'
            + timestamp(sent_at).encode() + b'"}')


class SegmentDestination:
    """Batches posted concurrently (`concurrency`), each within Segment's limits."""

    def __init__(self, name: str, config: SegmentConfig) -> None:
        key = config.write_key.get_secret_value()
        self.name = name
        self.max_batch = MAX_BATCH_MESSAGES * config.concurrency
        self.sender: HttpSender = make_sender(
            name, config, base_url=config.url, auth=httpx.BasicAuth(key, ""), headers={},
            secrets=[key], rate=config.rate_limit)
        self.stats = self.sender.stats
        self._pool = ThreadPoolExecutor(config.concurrency,
                                        thread_name_prefix=f"segment-{name}")

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        fitting: list[tuple[int, bytes]] = []
        for delivery in batch:
            message = encode(delivery)
            if len(message) > MAX_MESSAGE_BYTES:
                outcomes.append(Outcome(
                    delivery.id, ok=False, permanent=True, attempts=0,
                    error=f"message is {len(message):,} bytes; Segment accepts at most "
                          f"{MAX_MESSAGE_BYTES:,} bytes per message (not sent)"))
            else:
                fitting.append((delivery.id, message))
        for result in self._pool.map(self._post, pack(fitting)):
            outcomes += result
        return outcomes

    def _post(self, batch: list[tuple[int, bytes]]) -> list[Outcome]:
        body = batch_body([m for _, m in batch], datetime.now(UTC))
        reply = self.sender.call("POST", BATCH_PATH, content=body)
        return [outcome_of(delivery_id, reply) for delivery_id, _ in batch]

    def check(self) -> tuple[bool, str]:
        # An empty batch reaches the endpoint and its auth check without sending an identify.
        status, text = probe(self.sender, "POST", BATCH_PATH,
                             content=batch_body([], datetime.now(UTC)))
        if status is None:
            return False, text
        if status in (401, 403):
            return False, f"the write key was refused ({text})"
        if 200 <= status < 300:
            return True, (f"ok (reached {self.sender.client.base_url}; Segment itself accepts "
                          "any write key, so only a refusal proves a bad one)")
        return False, text

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.sender.close()
