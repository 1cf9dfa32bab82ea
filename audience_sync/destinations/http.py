"""What every HTTP destination shares: the failure policy, the rate limiter, one retrying call.

The failure policy is one pure function (`classify`) plus one pure backoff (`backoff_delay`),
table-tested; `HttpSender.call` is the only loop that applies them.
"""

from __future__ import annotations

import base64
import email.utils
import enum
import functools
import json
import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import httpx

from audience_sync import __version__
from audience_sync.config import PlanhatDestination as PlanhatConfig
from audience_sync.config import RateLimit
from audience_sync.config import SegmentDestination as SegmentConfig
from audience_sync.destinations.base import Outcome

log = logging.getLogger("audience_sync.delivery")

USER_AGENT = f"audience-sync/{__version__}"
# An error message quoted from a destination is cut to this many characters.
ERROR_SNIPPET = 240


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default verifying context (certifi, or SSL_CERT_FILE/SSL_CERT_DIR), built once
    per process: loading the CA bundle took longer than a whole drain of a few changes."""
    return httpx.create_ssl_context()


class Verdict(enum.Enum):
    OK = "ok"  # acknowledged
    RETRY = "retry"  # transient: network error, timeout, 5xx, 429
    PERMANENT = "permanent"  # other 4xx: failed until the operator retries
    HALT = "halt"  # 401/403: bad credentials, stop the destination for this run


def classify(status: int | None) -> Verdict:
    """The failure policy. `None` is a network error or a timeout (no HTTP answer)."""
    if status is None:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.OK
    if status in (401, 403):
        return Verdict.HALT
    # 408 Request Timeout and 429 Too Many Requests are the server asking us to come back.
    if status in (408, 429) or status >= 500:
        return Verdict.RETRY
    return Verdict.PERMANENT


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None,
                  jitter: float) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 0).

    Exponential with "equal jitter" (half fixed, half random, `jitter` in [0, 1)), capped at
    `cap`; a server's Retry-After wins when it asks for longer.
    """
    ceiling = min(cap, base * (2.0 ** min(attempt, 32)))
    delay = ceiling / 2 + ceiling / 2 * jitter
    if retry_after is not None:
        delay = max(delay, retry_after) if retry_after > 0 else delay
    return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds (fractions accepted) or an HTTP date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class Limiter(Protocol):
    """What HttpSender asks of a rate limiter: one slot per request, and a pause for everyone
    after a 429 (this process's RateLimiter, or ratelimit.SharedRateLimiter across daemons)."""

    def acquire(self, stop: threading.Event | None = None) -> bool: ...

    def hold_until(self, monotonic_at: float) -> None: ...


class RateLimiter:
    """Evenly spaced request slots at `rate` per second, shared by threads (GCRA, burst 1).

    Spacing instead of bursting keeps us under a server that counts in short windows;
    `hold_until` makes every thread wait when the server answered 429 with Retry-After.
    """

    def __init__(self, rate: RateLimit) -> None:
        self.rate = rate
        self.interval = 1.0 / rate.per_second
        self._lock = threading.Lock()
        self._next = 0.0

    def reserve(self) -> float:
        """Take the next slot; the monotonic time at which it starts."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
            return slot

    def hold_until(self, monotonic_at: float) -> None:
        with self._lock:
            self._next = max(self._next, monotonic_at)

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for a slot; False when `stop` was set meanwhile."""
        delay = self.reserve() - time.monotonic()
        if delay > 0:
            if stop is not None:
                return not stop.wait(delay)
            time.sleep(delay)
        return not (stop is not None and stop.is_set())


class LimiterRegistry:
    """One limiter per destination name and rate, shared by every audience and drain."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limiters: dict[tuple[str, RateLimit], RateLimiter] = {}

    def get(self, name: str, rate: RateLimit) -> RateLimiter:
        with self._lock:
            return self._limiters.setdefault((name, rate), RateLimiter(rate))


# The process-wide registry: drains come and go (CLI, daemon ticks, threads) but a destination's
# rate limit is a property of the destination, so its limiter must outlive any one drain.
LIMITERS = LimiterRegistry()


class Redactor:
    """Removes secrets (and their Basic-auth encodings) from text before it is shown."""

    def __init__(self, secrets: Iterable[str]) -> None:
        found: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            found.add(secret)
            found.add(base64.b64encode(f"{secret}:".encode()).decode())
        self._pattern = re.compile("|".join(re.escape(s) for s in sorted(found, key=len,
                                                                        reverse=True))) \
            if found else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub("***", text) if self._pattern else text


@dataclass(frozen=True)
class Reply:
    """The final answer of one call, after its retries."""

    verdict: Verdict
    status: int | None
    body: bytes
    error: str | None  # one line, secrets removed; None when ok
    attempts: int
    retry_after: float | None = None  # the server asked for this long (deferred deliveries)

    def json(self) -> object:
        try:
            return json.loads(self.body) if self.body else None
        except ValueError:
            return None


@dataclass
class SendStats:
    """What happened on the wire during one drain (thread-safe counters)."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, retries: int = 0, throttled: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.throttled += throttled

    def take(self) -> dict[str, int]:
        with self._lock:
            out = {"requests": self.requests, "retries": self.retries,
                   "throttled": self.throttled}
            self.requests = self.retries = self.throttled = 0
            return out


@dataclass(frozen=True)
class Policy:
    max_retries: int
    backoff_base: float
    backoff_max: float


class HttpSender:
    """One httpx client, one limiter and the retry loop, for one destination."""

    def __init__(self, name: str, *, base_url: str, auth: httpx.Auth | None,
                 headers: dict[str, str], timeout: float, policy: Policy,
                 limiter: Limiter, redactor: Redactor, pool: int) -> None:
        self.name = name
        self.policy = policy
        self.limiter = limiter
        self.redact = redactor
        self.stats = SendStats()
        # Set on 401/403: every thread of this destination stops sending for this drain.
        self.halted = threading.Event()
        self.halt_reason: str | None = None
        self._rand = random.Random()
        self.client = httpx.Client(
            base_url=base_url, auth=auth, headers=headers, timeout=timeout,
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            follow_redirects=False, verify=tls_context())

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, *, content: bytes | None = None,
             rate_limited: bool = True,
             describe: Callable[[int, bytes], str] | None = None) -> Reply:
        """Send one request under the failure policy; retries happen here and only here."""
        attempts = 0
        last_error = "not sent"
        last_status: int | None = None
        retry_after: float | None = None
        while True:
            if self.halted.is_set():
                return Reply(Verdict.HALT, None, b"", self.halt_reason, attempts)
            if rate_limited and not self.limiter.acquire(self.halted):
                return Reply(Verdict.HALT, None, b"", self.halt_reason, attempts)
            attempts += 1
            self.stats.add(requests=1)
            retry_after = None
            try:
                response = self.client.request(
                    method, path, content=content,
                    headers={"Content-Type": "application/json"} if content is not None
                    else None)
                body = response.read()
                status: int | None = response.status_code
            except httpx.TimeoutException as exc:
                status, body = None, b""
                last_error = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                status, body = None, b""
                detail = _one_line(str(exc)) or type(exc).__name__
                last_error = self.redact(f"network error: {detail}")
            verdict = classify(status)
            if status is not None:
                last_status = status
                if verdict is Verdict.OK:
                    return Reply(verdict, status, body, None, attempts)
                last_error = self._describe(status, body, describe)
                if status == 429:
                    self.stats.add(throttled=1)
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if verdict is Verdict.HALT:
                if not self.halted.is_set():
                    self.halt_reason = (f"destination {self.name!r} refused the credentials "
                                        f"({last_error}); stopped for this run")
                    self.halted.set()
                return Reply(verdict, status, body, self.halt_reason, attempts)
            if verdict is Verdict.PERMANENT:
                return Reply(verdict, status, body, last_error, attempts)
            # Transient.
            if attempts > self.policy.max_retries or (
                    retry_after is not None and retry_after > self.policy.backoff_max):
                return Reply(Verdict.RETRY, last_status, b"", last_error, attempts,
                             retry_after=retry_after)
            delay = backoff_delay(attempts - 1, base=self.policy.backoff_base,
                                  cap=self.policy.backoff_max, retry_after=retry_after,
                                  jitter=self._rand.random())
            self.stats.add(retries=1)
            log.info("%s: %s; retrying in %.2fs (attempt %d of %d)", self.name, last_error,
                     delay, attempts + 1, self.policy.max_retries + 1)
            if retry_after is not None:
                # Everyone sending to this destination waits, not only this thread.
                self.limiter.hold_until(time.monotonic() + delay)
            if self.halted.wait(delay):
                return Reply(Verdict.HALT, None, b"", self.halt_reason, attempts)

    def _describe(self, status: int, body: bytes,
                  describe: Callable[[int, bytes], str] | None) -> str:
        text = describe(status, body) if describe else destination_message(body)
        reason = httpx.codes.get_reason_phrase(status)
        prefix = f"HTTP {status}" + (f" {reason}" if reason else "")
        return self.redact(f"{prefix}: {text}" if text else prefix)


def destination_message(body: bytes) -> str:
    """The destination's own words: a JSON `message`/`error` field, or the start of the body."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        for key in ("message", "error", "detail", "reason"):
            value = document.get(key)
            if isinstance(value, str) and value:
                return _one_line(value)
    return _one_line(body.decode("utf-8", errors="replace"))


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= ERROR_SNIPPET else line[:ERROR_SNIPPET - 1] + "…"


def make_sender(name: str, config: PlanhatConfig | SegmentConfig, *, base_url: str,
                auth: httpx.Auth | None, headers: dict[str, str], secrets: Iterable[str],
                rate: RateLimit, limiter: Limiter | None = None) -> HttpSender:
    """limiter: the destination's budget when it is shared beyond this process; else the
    process-wide limiter of this destination and rate."""
    return HttpSender(
        name, base_url=base_url, auth=auth, headers={"User-Agent": USER_AGENT, **headers},
        timeout=config.timeout.total_seconds(),
        policy=Policy(config.max_retries, config.backoff_base, config.backoff_max),
        limiter=limiter if limiter is not None else LIMITERS.get(name, rate),
        redactor=Redactor(secrets),
        pool=config.concurrency)


def outcomes_of(delivery_ids: Iterable[int], reply: Reply) -> list[Outcome]:
    """The outcomes of every delivery a request carried: one reply, one verdict for all
    (built positionally: a large drain makes one per delivery)."""
    if reply.verdict is Verdict.OK:
        attempts = reply.attempts
        return [Outcome(i, True, False, None, None, False, attempts) for i in delivery_ids]
    return [outcome_of(i, reply) for i in delivery_ids]


def outcome_of(delivery_id: int, reply: Reply) -> Outcome:
    """One delivery's outcome from the reply to the request that carried it."""
    if reply.verdict is Verdict.OK:
        return Outcome(delivery_id, ok=True, attempts=reply.attempts)
    return Outcome(delivery_id, ok=False, permanent=reply.verdict is Verdict.PERMANENT,
                   halt=reply.verdict is Verdict.HALT, error=reply.error,
                   retry_after=reply.retry_after, attempts=reply.attempts)


def probe(sender: HttpSender, method: str, path: str, *,
          content: bytes | None = None) -> tuple[int | None, str]:
    """One request without retries (for `check`): (status or None, what happened)."""
    try:
        response = sender.client.request(
            method, path, content=content,
            headers={"Content-Type": "application/json"} if content is not None else None)
    except httpx.TransportError as exc:
        return None, sender.redact(f"cannot reach {sender.client.base_url}: "
                                   f"{_one_line(str(exc)) or type(exc).__name__}")
    return response.status_code, sender._describe(response.status_code, response.read(), None)
