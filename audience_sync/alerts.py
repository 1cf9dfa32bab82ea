"""Alerts: which ones a finished run or drain fires, and the webhook that carries them.

The decision is pure (`after_run`, `after_drain`): given what a target was last told about an
audience (`AlertState`, kept in the state store) and what just happened, it returns the alerts
to send and the new state. A condition that lasts (a source failing on every run, a held run
retried each cadence) alerts once when it starts and once when it ends, never once per tick.

Sending never fails or blocks a run: `AlertSender` posts from one background thread with a
short timeout and a few quick retries, logs an unreachable webhook at WARNING, and is joined
for a bounded time at exit. An alert it could not deliver puts the target's state back as it
was, so the condition alerts again at the next run or drain that finds it. A webhook URL (a
Slack hook's path is its secret) is never logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from audience_sync.clock import iso
from audience_sync.states import RunStatus

if TYPE_CHECKING:
    from audience_sync.config import AlertConfig, Config
    from audience_sync.drain import DrainReport
    from audience_sync.runner import RunResult
    from audience_sync.state.store import Store

log = logging.getLogger("audience_sync.alerts")

# Attempts per alert, and the pause before each retry: a few seconds in all, then it is dropped.
ATTEMPTS = 3
RETRY_PAUSE = 0.5
# How long a CLI command waits at exit for alerts still being sent.
EXIT_WAIT = 10.0


@dataclass(frozen=True)
class AlertState:
    """What one target was last told about one audience."""

    failing: bool = False  # a `failed` condition began (and no recovery since)
    held: bool = False  # a held run was reported (and no applied run since)
    failed_deliveries: int = 0  # the permanently failed deliveries last reported


@dataclass(frozen=True)
class RunOutcome:
    """The figures of a finished run the decision needs (from its run record)."""

    key: str
    run_id: int | None
    status: RunStatus
    members: int
    previous_members: int
    consecutive_failures: int  # after this run
    at: datetime
    error: str | None = None
    entered: int = 0
    exited: int = 0


@dataclass(frozen=True)
class Rule:
    on: frozenset[str]
    failures: int = 1
    threshold: float = 0.2


@dataclass(frozen=True)
class Alert:
    event: str
    audience: str
    at: datetime
    run_id: int | None = None
    reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        figures = ", ".join(f"{name.replace('_', ' ')} {n}" for name, n in self.counts.items())
        head = {"failed": "run failed", "held": "run held by the removal guard",
                "recovered": "recovered", "size_change": "member count changed sharply",
                "deliveries_failed": "deliveries failed"}[self.event]
        parts = [f"audience-sync: {self.audience}: {head}"]
        if figures:
            parts.append(f"({figures})")
        if self.reason:
            parts.append(f"- {self.reason}")
        return " ".join(parts)

    def body(self) -> dict[str, Any]:
        """Slack's incoming webhooks read `text`; other receivers read the fields."""
        return {"text": self.text, "event": self.event, "audience": self.audience,
                "run_id": self.run_id, "reason": self.reason, "counts": self.counts,
                "at": iso(self.at)}


def after_run(state: AlertState, run: RunOutcome, rule: Rule) -> tuple[list[Alert], AlertState]:
    """The alerts a finished run fires for one target, and that target's new state."""
    fired: list[Alert] = []
    counts = {"members": run.members, "previous_members": run.previous_members}

    def fire(event: str, reason: str | None, **extra: int) -> None:
        if event in rule.on:
            fired.append(Alert(event, run.key, run.at, run.run_id, reason, {**counts, **extra}))

    if run.status == RunStatus.FAILED:
        if not state.failing and run.consecutive_failures >= rule.failures:
            fire("failed", run.error, consecutive_failures=run.consecutive_failures)
            state = replace(state, failing=True)
    elif run.status == RunStatus.HELD:
        if not state.held:
            fire("held", run.error, exited=run.exited)
            state = replace(state, held=True)
    elif run.status == RunStatus.SUCCEEDED:
        if state.failing or state.held:
            fire("recovered", "the last run succeeded")
            state = replace(state, failing=False, held=False)
        if run.previous_members > 0:
            moved = abs(run.members - run.previous_members) / run.previous_members
            if moved > rule.threshold:
                fire("size_change", f"{run.previous_members} -> {run.members} members "
                     f"({moved:.0%} > {rule.threshold:.0%})",
                     entered=run.entered, exited=run.exited)
    return fired, state


def after_drain(state: AlertState, key: str, failed: int, at: datetime,
                rule: Rule) -> tuple[list[Alert], AlertState]:
    """After a drain: alert when more deliveries failed for good than were last reported."""
    if failed <= state.failed_deliveries:
        # Fewer (retried, or pruned): remember it, so the next failures alert again.
        return [], replace(state, failed_deliveries=failed)
    fired = []
    if "deliveries_failed" in rule.on:
        fired.append(Alert("deliveries_failed", key, at, None,
                           f"{failed} deliveries failed permanently (see `audience-sync "
                           "deliveries --failed`; `retry` re-queues them)",
                           {"failed": failed, "new": failed - state.failed_deliveries}))
    return fired, replace(state, failed_deliveries=failed)


def rule_of(alert: AlertConfig) -> Rule:
    return Rule(frozenset(alert.on), alert.failures, alert.threshold)


# -- the glue: read the state, decide, remember, send ------------------------------------------

def notify_run(store: Store, config: Config, result: RunResult, sender: AlertSender | None,
               at: datetime) -> None:
    """Decide and queue the alerts of a finished (not dry) run; never raises."""
    if sender is None or not config.alerts or result.run_id is None:
        return
    from audience_sync.state import alerts as stored

    try:
        row = store.computation(result.key)
        if row is None:
            return
        outcome = RunOutcome(result.key, result.run_id, result.status, result.members,
                             result.previous_members, row.consecutive_failures, at,
                             result.error, result.entered, result.exited)
        for index, alert in enumerate(config.alerts):
            with stored.alert_state(store, row.id, alert.target, at) as slot:
                before = slot.state
                fired, slot.state = after_run(slot.state, outcome, rule_of(alert))
            sender.send(index, alert, fired, _undo(store, row.id, alert.target, slot.state,
                                                   before, at))
    except Exception:  # an alert must never fail a run
        log.exception("%s: deciding alerts failed", result.key)


def notify_drain(store: Store, config: Config, report: DrainReport | None,
                 keys: Sequence[str], sender: AlertSender | None, at: datetime) -> None:
    """After a drain of `keys`: alert on deliveries that newly failed for good; never raises."""
    if sender is None or not config.alerts or not any(
            "deliveries_failed" in a.on for a in config.alerts):
        return
    if report is not None and not any(d.failed for d in report.destinations.values()):
        return  # nothing newly failed: no need to count
    from audience_sync.state import alerts as stored

    try:
        for key in keys:
            row = store.computation(key)
            if row is None:
                continue
            failed = stored.failed_count(store, row.id)
            for index, alert in enumerate(config.alerts):
                with stored.alert_state(store, row.id, alert.target, at) as slot:
                    before = slot.state
                    fired, slot.state = after_drain(slot.state, key, failed, at,
                                                    rule_of(alert))
                sender.send(index, alert, fired, _undo(store, row.id, alert.target,
                                                       slot.state, before, at))
    except Exception:  # an alert must never fail a drain
        log.exception("deciding delivery alerts failed")


def _undo(store: Store, computation_id: int, target: str, told: AlertState,
          before: AlertState, at: datetime) -> Callable[[], None]:
    """What to do when the alerts of a decision were not delivered: put the target's state
    back as it was before the decision (unless a later decision changed it since)."""
    def undo() -> None:
        from audience_sync.state import alerts as stored

        stored.restore(store, computation_id, target, told, before, at)
    return undo


class AlertSender:
    """Posts alerts from one background thread: a slow or dead webhook delays nothing."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[int, AlertConfig, Alert, Callable[[], None] | None]
                                 | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.dropped = 0

    def send(self, index: int, target: AlertConfig, alerts: Sequence[Alert],
             on_lost: Callable[[], None] | None = None) -> None:
        """Queue alerts for one target; `on_lost` runs (in the sender's thread) for each one
        that could not be delivered."""
        for alert in alerts:
            log.info("alert %s for %s to alerts[%d]", alert.event, alert.audience, index)
            self._queue.put((index, target, alert, on_lost))
        if alerts and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="alerts", daemon=True)
            self._thread.start()

    def close(self, wait: float = EXIT_WAIT) -> None:
        """Let the alerts in the queue go out, waiting at most `wait` seconds."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(wait)
        if self._thread.is_alive():
            log.warning("alerts: gave up waiting for the webhook after %.0fs; "
                        "unsent alerts are dropped", wait)

    def _work(self) -> None:
        import httpx

        with httpx.Client(follow_redirects=False) as client:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                index, target, alert, on_lost = item
                if self._post(client, target, alert):
                    self.sent += 1
                    continue
                self.dropped += 1
                log.warning("alerts[%d]: %s alert for %s not delivered after %d attempts; "
                            "it is sent again when the condition is found again", index,
                            alert.event, alert.audience, ATTEMPTS)
                if on_lost is not None:
                    try:
                        on_lost()
                    except Exception:  # the state store may be down too: the alert is lost
                        log.exception("alerts[%d]: could not record that the %s alert for "
                                      "%s was lost", index, alert.event, alert.audience)

    def _post(self, client: Any, target: AlertConfig, alert: Alert) -> bool:
        import httpx

        timeout = target.timeout.total_seconds()
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(RETRY_PAUSE * attempt)  # a short, bounded backoff between attempts
            try:
                response = client.post(target.url.get_secret_value(), json=alert.body(),
                                       timeout=httpx.Timeout(timeout))
            except httpx.HTTPError as exc:
                # The exception's text may quote the URL: only its kind is logged.
                log.debug("alert attempt %d failed: %s", attempt + 1, type(exc).__name__)
                continue
            if response.status_code < 300:
                return True
            log.debug("alert attempt %d: HTTP %d", attempt + 1, response.status_code)
            if 400 <= response.status_code < 500 and response.status_code != 429:
                return False  # refused for good: retrying sends the same refusal
        return False
