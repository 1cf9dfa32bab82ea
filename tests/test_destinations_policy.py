"""The failure policy, backoff, Retry-After, batching and redaction: pure functions, tables."""

from __future__ import annotations

import itertools
import json
import threading
import time
from datetime import UTC, datetime

import pytest

from audience_sync.config import RateLimit
from audience_sync.destinations.http import (
    Redactor,
    Verdict,
    backoff_delay,
    classify,
    parse_retry_after,
)
from audience_sync.destinations.planhat import enduser_items, item_errors
from audience_sync.destinations.segment import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    encode,
    pack,
)
from audience_sync.messages import DEFAULT_STYLE, Delivery, Style, message
from audience_sync.ratelimit import LocalSlots, RateLimiter


@pytest.mark.parametrize(("status", "verdict"), [
    (None, Verdict.RETRY),  # network error or timeout
    (200, Verdict.OK), (201, Verdict.OK), (204, Verdict.OK), (206, Verdict.OK),
    (500, Verdict.RETRY), (502, Verdict.RETRY), (503, Verdict.RETRY), (504, Verdict.RETRY),
    (429, Verdict.RETRY), (408, Verdict.RETRY),
    (401, Verdict.HALT), (403, Verdict.HALT),
    (400, Verdict.PERMANENT), (404, Verdict.PERMANENT), (413, Verdict.PERMANENT),
    (422, Verdict.PERMANENT), (301, Verdict.PERMANENT),
])
def test_classify(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


@pytest.mark.parametrize(("attempt", "jitter", "retry_after", "expected"), [
    (0, 0.0, None, 0.25),  # half of base, fixed part
    (0, 0.999999, None, 0.5),  # up to the full base
    (1, 0.0, None, 0.5),
    (3, 0.0, None, 2.0),
    (10, 0.0, None, 15.0),  # capped at 30: half fixed
    (10, 1.0, None, 30.0),
    (0, 0.0, 7.0, 7.0),  # Retry-After longer than the backoff wins
    (5, 1.0, 1.0, 16.0),  # the backoff longer than Retry-After wins
    (0, 0.0, 0.0, 0.25),
])
def test_backoff_delay(attempt: int, jitter: float, retry_after: float | None,
                       expected: float) -> None:
    delay = backoff_delay(attempt, base=0.5, cap=30.0, retry_after=retry_after, jitter=jitter)
    assert delay == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), ("3", 3.0), (" 0.25 ", 0.25), ("soon", None),
    ("Sat, 28 Nov 2026 10:00:30 GMT", 30.0), ("Sat, 28 Nov 2026 09:59:00 GMT", 0.0),
    ("3600", 3600.0), ("604800", 604800.0),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now) == expected


@pytest.mark.parametrize("value", [
    "Fri, 31 Dec 9999 23:59:59 GMT", "1e10", "inf", "-inf", "nan", "-4", "604801",
    "1e400", "Fri, 31 Dec 99999 23:59:59 GMT",
])
def test_retry_after_absurd_or_non_finite_is_absent(value: str) -> None:
    now = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now) is None


def test_retry_after_never_stretches_a_backoff_past_its_cap() -> None:
    for retry_after in (1e10, float("inf"), float("nan"), -5.0):
        delay = backoff_delay(0, base=0.5, cap=30.0, retry_after=retry_after, jitter=0.0)
        assert 0 < delay <= 30.0


def test_redactor_removes_secrets_and_their_basic_auth_form() -> None:
    redact = Redactor(["s3cret", ""])
    assert redact("token s3cret in Basic czNjcmV0Og== here") == "token *** in Basic *** here"
    assert Redactor([])("nothing") == "nothing"


def test_rate_limiter_spaces_slots_across_threads() -> None:
    limiter = RateLimiter(RateLimit(100, 1))
    slots: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(10):
            slot = limiter.reserve()
            with lock:
                slots.append(slot)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    slots.sort()
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert len(slots) == 40 and min(gaps) == pytest.approx(0.01)


def test_rate_limiter_hold_pushes_every_later_slot() -> None:
    limiter = RateLimiter(RateLimit(1000, 1))
    at = time.monotonic() + 5
    limiter.hold_until(at)
    assert limiter.reserve() >= at
    stop = threading.Event()
    stop.set()
    assert limiter.acquire(stop) is False  # a stopped destination gives up its wait


def test_limiter_takes_blocks_of_slots_from_its_source() -> None:
    """One GCRA, any slot source: a block of slots per round trip, handed out evenly spaced."""
    calls: list[tuple[float, int]] = []
    local = LocalSlots()

    class Counting:
        def take(self, earliest: float, slots: int, interval: float) -> float:
            calls.append((earliest, slots))
            return local.take(earliest, slots, interval)

    limiter = RateLimiter(RateLimit(1000, 1), Counting(), block=4)
    slots = [limiter._take() for _ in range(8)]
    assert [n for _, n in calls] == [4, 4]
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert all(gap == pytest.approx(0.001) for gap in gaps)


def _delivery(i: int, user: str, key: str = "aud", value: str = "true",
              email: str | None = None) -> Delivery:
    return Delivery(i, key, "audience", 1, "d", user, value, email, None, None, None,
                    datetime(2026, 1, 1, tzinfo=UTC))


def test_enduser_items_merge_one_user_across_audiences() -> None:
    items, owners = enduser_items([_delivery(1, "u1", "a", "true", "x@y.z"),
                                   _delivery(2, "u2", "a", "false"),
                                   _delivery(3, "u1", "b", "42")])
    assert items == [{"externalId": "u1", "email": "x@y.z", "custom": {"a": True, "b": 42}},
                     {"externalId": "u2", "custom": {"a": False}}]
    assert [d.id for d in owners["u1"]] == [1, 3]


@pytest.mark.parametrize(("document", "partial", "named", "proven"), [
    # 200: everything accepted unless an error entry says otherwise.
    ({"createdErrors": [], "updatedErrors": []}, False, {}, True),
    ("not an object", False, {}, True),
    ({"createdErrors": [{"item": {"externalId": "u2"}, "error": "no company"}]}, True,
     {"u2": "no company"}, True),
    ({"updatedErrors": [{"externalId": "u1", "message": "bad  field"}]}, True,
     {"u1": "bad  field"}, True),
    ({"permissionErrors": [{"index": 1}]}, True, {"u2": "listed in permissionErrors"}, True),
    # Errors that name no item of the request prove nothing about the others.
    ({"createdErrors": ["something failed"]}, False, {}, False),
    ({"createdErrors": "oops"}, False, {}, False),
    ({"createdErrors": [{"externalId": "u2", "error": "x"}, {"externalId": "zz"}]}, True,
     {"u2": "x"}, False),
    # A 206 must name what failed: an HTML body, `{}`, empty lists or a stranger prove nothing.
    ("<html>busy</html>", True, {}, False),
    ({}, True, {}, False),
    ({"createdErrors": [], "updatedErrors": [], "permissionErrors": []}, True, {}, False),
    ({"createdErrors": [{"externalId": "not-sent", "error": "x"}]}, True, {}, False),
    ({"createdErrors": [{"index": 7}]}, True, {}, False),
])
def test_item_errors_acknowledge_only_what_the_answer_proves(
        document: object, partial: bool, named: dict[str, str], proven: bool) -> None:
    items = [{"externalId": "u1"}, {"externalId": "u2"}]
    assert item_errors(document, items, partial=partial) == (named, proven)


def test_pack_respects_count_and_bytes() -> None:
    small = [(i, b"x" * 10) for i in range(MAX_BATCH_MESSAGES + 1)]
    assert [len(b) for b in pack(small)] == [MAX_BATCH_MESSAGES, 1]
    big = [(i, b"y" * 30_000) for i in range(40)]
    batches = pack(big)
    assert all(sum(len(m) + 1 for _, m in b) + 64 <= MAX_BATCH_BYTES for b in batches)
    assert sum(len(b) for b in batches) == 40 and len(batches) == 3


@pytest.mark.parametrize("delivery", [
    _delivery(1, "u1"),
    _delivery(2, "ü-ñ \"quoted\"", "aud", "false", "é@example.com"),
    Delivery(3, "score", "trait", 7, "d", "u3", '{"a": [1, 2.5, null]}', "x@y.z", "Ann",
             "CTO", "c9", datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)),
    # An audience key named like a contact trait replaces it in place.
    _delivery(4, "u4", "email", "true", "x@y.z"),
    Delivery(5, "k\u2028\"", "trait", 2, "d", "u\x00", '"caf\u00e9\\n"', None, "N\t", None, "c",
             datetime(2026, 1, 1, 23, 59, 59, 999999, tzinfo=UTC)),
])
@pytest.mark.parametrize("call", ["identify", "track"])
def test_segment_encode_is_the_message_byte_for_byte(delivery: Delivery, call: str) -> None:
    delivery = delivery._replace(call=call)
    style = Style(space="sp\u00e9", entered="Entr\u00e9", exited="Left", trait="T \"q\"")
    for using in (DEFAULT_STYLE, style):
        expected = json.dumps(message(delivery, using), separators=(",", ":")).encode()
        assert encode(delivery, using) == expected
