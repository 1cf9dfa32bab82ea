"""What every HTTP destination shares: the failure policy, the rate limiter, one retrying call.

The failure policy is one pure function (`classify`) plus one pure backoff (`backoff_delay`),
table-tested; `HttpSender.call` is the only loop that applies them.
"""

from __future__ import annotations

import email.utils
import enum
import functools
import json
import logging
import math
import random
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from audience_sync import __version__
from audience_sync.config import PlanhatConfig, RateLimit, SegmentConfig
from audience_sync.destinations.base import Outcome, SendStats
from audience_sync.destinations.redact import Redactor, mask_url, url_secrets
from audience_sync.destinations.wire import bound_requests, request_scope
from audience_sync.errors import DestinationError
from audience_sync.ratelimit import RateLimiter

__all__ = ["HttpSender", "RateLimiter", "Redactor", "Reply", "Verdict", "backoff_delay", "classify",
           "make_sender", "mask_url", "outcome_of", "outcomes_of", "parse_retry_after", "probe"]

log = logging.getLogger("audience_sync.delivery")

USER_AGENT = f"audience-sync/{__version__}"
# An error message quoted from a destination is cut to this many characters (after redaction).
ERROR_SNIPPET = 240
# A Retry-After beyond this is a server bug, not a rate limit window: treated as absent.
ABSURD_RETRY_AFTER = 7 * 86400.0
# What a request interrupted by shutdown says; its deliveries stay pending.
INTERRUPTED = "interrupted: the process is stopping"


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
    `cap`; a server's Retry-After wins when it asks for longer, up to `cap` too.
    """
    ceiling = min(cap, base * (2.0 ** min(attempt, 32)))
    delay = ceiling / 2 + ceiling / 2 * jitter
    if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
        delay = max(delay, min(retry_after, cap))
    return delay


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds (fractions accepted) or an HTTP date.

    None when absent or unusable: not a number or date, negative, not finite, or beyond
    ABSURD_RETRY_AFTER (`1e10`, year 9999): such a value would park deliveries for centuries.
    A date in the past is 0 (come back now).
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
    if not math.isfinite(seconds) or seconds < 0 or seconds > ABSURD_RETRY_AFTER:
        return None
    return seconds


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


@dataclass(frozen=True)
class Policy:
    max_retries: int
    backoff_base: float
    backoff_max: float
    # The longest a Retry-After may defer a delivery past this drain (seconds).
    max_defer: float = 3600.0


@dataclass(frozen=True)
class _Exchange:
    """One attempt on the wire: an answer (status), or why there is none (error)."""

    status: int | None
    body: bytes = b""
    retry_after: str | None = None
    error: str | None = None
    # The request could not even be built (a header value httpx refuses): a configuration
    # error that no retry fixes.
    unusable: bool = False


class _HeadersCarryAuth(httpx.Auth):
    """The request's headers already hold its credentials: send it as it is."""


class HttpSender:
    """One httpx client, one limiter and the retry loop, for one destination."""

    def __init__(self, name: str, *, base_url: str, auth: httpx.Auth | None,
                 headers: dict[str, str], timeout: float, policy: Policy,
                 limiter: RateLimiter, redactor: Redactor, pool: int) -> None:
        self.name = name
        self.policy = policy
        self.limiter = limiter
        self.redact = redactor
        self.timeout = timeout
        self.stats = SendStats()
        # Set on 401/403 or an unusable request: every thread of this destination stops
        # sending for this drain.
        self.halted = threading.Event()
        self.halt_reason: str | None = None
        # Set by interrupt(): the requests on the wire end now, their deliveries stay pending.
        self.interrupted = threading.Event()
        self._rand = random.Random()
        # `timeout` is each socket operation's bound in httpx; bound_requests makes it the
        # whole request's (see wire.py).
        # A query in base_url (a proxy's key) goes on every request: httpx would append the
        # request's path to it. Credentials in the destination's own headers (a Bearer token)
        # are not replaced by Basic from the URL's userinfo, which httpx does when no auth is
        # given.
        self._base_url = base_url.rstrip("/")
        url = httpx.URL(base_url)
        if auth is None and any(h.lower() == "authorization" for h in headers):
            auth = _HeadersCarryAuth()
        self.client = bound_requests(httpx.Client(
            base_url=url.copy_with(query=None, fragment=None), params=url.params,
            auth=auth, headers=headers, timeout=timeout,
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            follow_redirects=False, verify=tls_context()))

    @property
    def shown_url(self) -> str:
        """The base URL as it may be shown: userinfo and query values masked."""
        return mask_url(self._base_url)

    def interrupt(self, reason: str = INTERRUPTED) -> None:
        """End every request of this destination now (the process is stopping); what they
        carried stays pending."""
        self.halt_reason = reason
        self.interrupted.set()
        self.halted.set()

    def close(self) -> None:
        self.client.close()

    def exchange(self, method: str, path: str, content: bytes | None = None) -> _Exchange:
        """One attempt, within the request's total deadline; never raises for the wire."""
        try:
            with request_scope(self.timeout, self.interrupted):
                response = self.client.request(
                    method, path, content=content,
                    headers={"Content-Type": "application/json"} if content is not None
                    else None)
        except httpx.TimeoutException as exc:
            if self.interrupted.is_set():
                return _Exchange(None, error=INTERRUPTED)
            return _Exchange(None, error=f"timed out after {self.timeout:g}s "
                                         f"({type(exc).__name__})")
        except (httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.InvalidURL,
                UnicodeEncodeError) as exc:
            # httpx refused to build the request, e.g. `Illegal header value b'Bearer ...\n'`:
            # its message quotes the secret, so only a redacted line of it is kept.
            return _Exchange(None, error=self.line(
                f"the request cannot be sent ({type(exc).__name__}: {exc}); check the "
                "destination's token and base_url for stray characters"), unusable=True)
        except httpx.TransportError as exc:
            return _Exchange(None, error=self.line(
                f"network error: {str(exc) or type(exc).__name__}"))
        return _Exchange(response.status_code, response.content,
                         response.headers.get("Retry-After"))

    def call(self, method: str, path: str, *, content: bytes | None = None,
             rate_limited: bool = True) -> Reply:
        """Send one request under the failure policy; retries happen here and only here."""
        attempts = 0
        last_error = "not sent"
        last_status: int | None = None
        while True:
            if self.halted.is_set():
                return Reply(Verdict.HALT, None, b"", self.halt_reason, attempts)
            if rate_limited and not self.limiter.acquire(self.halted):
                return Reply(Verdict.HALT, None, b"", self.halt_reason, attempts)
            attempts += 1
            self.stats.add(requests=1)
            retry_after: float | None = None
            wire = self.exchange(method, path, content)
            status, body = wire.status, wire.body
            if status is None:
                if self.interrupted.is_set():
                    return Reply(Verdict.HALT, None, b"", self.halt_reason, attempts)
                last_error = wire.error or "no answer"
            verdict = Verdict.HALT if wire.unusable else classify(status)
            if status is not None:
                last_status = status
                if verdict is Verdict.OK:
                    return Reply(verdict, status, body, None, attempts)
                last_error = self.describe(status, body)
                if status == 429:
                    self.stats.add(throttled=1)
                    retry_after = parse_retry_after(wire.retry_after)
            if verdict is Verdict.HALT:
                if not self.halted.is_set():
                    self.halt_reason = (
                        f"destination {self.name!r}: {last_error}; stopped for this run"
                        if wire.unusable else
                        f"destination {self.name!r} refused the credentials "
                        f"({last_error}); stopped for this run")
                    self.halted.set()
                return Reply(verdict, status, body, self.halt_reason, attempts)
            if verdict is Verdict.PERMANENT:
                return Reply(verdict, status, body, last_error, attempts)
            # Transient. A Retry-After longer than this drain's backoff defers the deliveries,
            # for at most max_defer.
            if attempts > self.policy.max_retries or (
                    retry_after is not None and retry_after > self.policy.backoff_max):
                deferral = None if retry_after is None else min(retry_after,
                                                                self.policy.max_defer)
                return Reply(Verdict.RETRY, last_status, b"", last_error, attempts,
                             retry_after=deferral)
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

    def describe(self, status: int, body: bytes) -> str:
        """`HTTP 400 Bad Request: <the destination's words>`, secrets removed, one short line."""
        reason = httpx.codes.get_reason_phrase(status)
        prefix = f"HTTP {status}" + (f" {reason}" if reason else "")
        text = destination_message(body)
        return self.line(f"{prefix}: {text}" if text else prefix)

    def line(self, text: str) -> str:
        """Text as it may be shown: redacted first, then one line, then cut (cutting first
        could leave a prefix of a secret that redaction no longer recognises)."""
        return _one_line(self.redact(text))


def destination_message(body: bytes) -> str:
    """The destination's own words, whole: a JSON `message`/`error` field, or the body."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        for key in ("message", "error", "detail", "reason"):
            value = document.get(key)
            if isinstance(value, str) and value:
                return value
    return body.decode("utf-8", errors="replace")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= ERROR_SNIPPET else line[:ERROR_SNIPPET - 1] + "…"


def make_sender(name: str, config: PlanhatConfig | SegmentConfig, *, base_url: str,
                auth: httpx.Auth | None, headers: dict[str, str], secrets: Iterable[str],
                rate: RateLimit, limiter: RateLimiter | None = None) -> HttpSender:
    """limiter: the destination's budget when it is shared beyond this process; else a limiter
    of this sender's own, at the configured rate. secrets: the destination's tokens;
    what its base_url carries (userinfo, query values) is added here.

    :raises DestinationError: a header value (a token) holds a character no HTTP header can
        carry; the message does not quote it.
    """
    for header, value in headers.items():
        if not value.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise DestinationError(
                f"destination {name!r}: the {header} header (its token) holds a character an "
                "HTTP header cannot carry (a control character or non-ASCII); check the "
                "secret's value")
    return HttpSender(
        name, base_url=base_url, auth=auth, headers={"User-Agent": USER_AGENT, **headers},
        timeout=config.timeout.total_seconds(),
        policy=Policy(config.max_retries, config.backoff_base, config.backoff_max,
                      config.max_defer.total_seconds()),
        limiter=limiter if limiter is not None else RateLimiter(rate),
        redactor=Redactor([*secrets, *url_secrets(base_url)]),
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
    wire = sender.exchange(method, path, content)
    if wire.status is None:
        if wire.unusable:
            return None, wire.error or "the request cannot be sent"
        return None, sender.line(f"cannot reach {sender.shown_url}: {wire.error}")
    return wire.status, sender.describe(wire.status, wire.body)
