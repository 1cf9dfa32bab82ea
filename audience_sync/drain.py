"""The drain: pending deliveries sent in batches, marked sent only once acknowledged.

Each destination drains in a thread of its own, so a slow or failing destination never holds
back the others; a destination with a `window` keeps that many claims on the wire at once, each
recorded as soon as it is answered. The claims themselves (row locks on PostgreSQL, lease
checks on SQLite) are state/outbox.py's: this module holds no SQL. A crash before the outcomes
commit leaves the rows pending, to be sent again (at-least-once, same messageId): at most the
claims on the wire.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from audience_sync.clock import Clock, utcnow
from audience_sync.config import Config, JsonlConfig
from audience_sync.destinations import Destination, Outcome, make_destination
from audience_sync.errors import AudienceSyncError
from audience_sync.leases import Lease
from audience_sync.progress import Tracker
from audience_sync.ratelimit import shared_limiter
from audience_sync.state.fields import StoredFields
from audience_sync.state.outbox import (
    DEFAULT_RETRY_LATER,
    Claim,
    Claims,
    count_pending,
    mark_initial_syncs_complete,
)
from audience_sync.state.store import Store

log = logging.getLogger("audience_sync.delivery")



@dataclass
class DestinationReport:
    sent: int = 0
    failed: int = 0
    deferred: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    error: str | None = None
    # Pending deliveries left behind by a drain that tried and did not deliver everything
    # (deferred or stopped), and the last reason a delivery was deferred.
    waiting: int = 0
    reason: str | None = None
    paused: bool = False  # stopped by the drain's owner (DrainControl), not by a problem

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "deferred": self.deferred,
                "requests": self.requests, "retries": self.retries,
                "throttled": self.throttled, "error": self.error, "waiting": self.waiting,
                "reason": self.reason, "paused": self.paused}


@dataclass
class DrainReport:
    destinations: dict[str, DestinationReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing failed, and nothing this drain tried is still waiting."""
        return all(r.failed == 0 and r.error is None and r.waiting == 0
                   for r in self.destinations.values())

    def waiting_lines(self) -> list[str]:
        """One line per destination that left deliveries waiting: how many, and why."""
        return [f"{name}: {r.waiting} deliveries still waiting ({r.error or r.reason})"
                for name, r in self.destinations.items() if r.waiting]

    def as_dict(self) -> dict[str, Any]:
        return {name: r.as_dict() for name, r in self.destinations.items()}


# Asked, per destination, for what follows its delivery: (name, deliveries due) -> a tracker
# told the deliveries done so far (progress.DeliveryProgress.tracker).
ProgressFactory = Callable[[str, int], Tracker]


def drain(store: Store, config: Config, leases: Sequence[Lease], *,
          clients: Mapping[str, Destination] | None = None,
          clock: Clock = utcnow, control: DrainControl | None = None,
          progress: ProgressFactory | None = None) -> DrainReport:
    """Send every due pending delivery of the leased audiences to its destination, each
    destination in a thread of its own (until `control` gives a reason to stop), telling
    `progress` how far each has got.

    Only audiences whose lease the caller holds are drained (and only configured ones: an
    orphaned audience sends nothing more); a lease taken over meanwhile stops the drain.
    """
    held = {lease.key: lease for lease in leases}
    wanted = [c for c in config.computations if c.key in held]
    leased = [held[c.key] for c in wanted]
    names = sorted({dest for comp in wanted for dest in comp.destinations})
    report = DrainReport({name: DestinationReport() for name in names})
    if names:
        with ThreadPoolExecutor(len(names), thread_name_prefix="drain") as pool:
            for name in names:
                pool.submit(_drain_guarded, store, config, name, leased, clients, clock,
                            report.destinations[name], control or DrainControl(), progress)
    mark_initial_syncs_complete(store)
    return report


def _drain_guarded(store: Store, config: Config, name: str, leases: list[Lease],
                   clients: Mapping[str, Destination] | None, clock: Clock,
                   report: DestinationReport, control: DrainControl,
                   progress: ProgressFactory | None) -> None:
    try:
        _drain_destination(store, config, name, leases, clients, clock, report, control,
                           progress)
    except AudienceSyncError as exc:
        report.error = exc.message
    except Exception as exc:  # a bug in one destination must not take the others down
        log.exception("destination %s: drain failed", name)
        report.error = f"destination {name!r}: unexpected {type(exc).__name__}"
    if report.error:
        # A drain paused by its owner (the daemon's slice used up, a stop) is routine; a
        # destination refusing credentials or unusable needs a person.
        log.log(logging.INFO if report.paused else logging.WARNING, "%s", report.error,
                extra={"summary": True})  # the CLI prints it in its drain report
    if report.failed:
        log.warning("destination %s: %d deliveries failed for good (see `audience-sync "
                    "deliveries --failed`, then `retry`)", name, report.failed)


class DrainControl:
    """The explicit stop signal of a drain, and what its owner (the daemon) sees of it.

    `reason()` is asked before each claim: a reason stops the drain there (the claims on the
    wire finish and are recorded; nothing more is claimed). `sending` counts the sends on the
    wire now; `on_sent` is called after each.
    """

    def __init__(self, reason: Callable[[], str | None] = lambda: None,
                 on_sent: Callable[[], None] = lambda: None) -> None:
        self.reason = reason
        self.on_sent = on_sent
        self.sending = 0
        self._lock = threading.Lock()

    @contextmanager
    def on_wire(self) -> Iterator[None]:
        with self._lock:
            self.sending += 1
        try:
            yield
        finally:
            with self._lock:
                self.sending -= 1
            self.on_sent()


class _Pipeline:
    """The drain of one destination by `window` workers side by side, each taking the next
    claim, sending it and recording its outcomes before it takes another.

    Claims load one at a time, in id order. A claim carrying a user whose older value is
    still on the wire waits for that answer first. So at most `window` claims are sent and
    not yet recorded: a crash re-sends at most those.
    """

    def __init__(self, claims: Claims, client: Destination, report: DestinationReport,
                 name: str, retry_later: timedelta, control: DrainControl,
                 tracker: Tracker | None = None) -> None:
        self.claims, self.client, self.report, self.name, self.retry_later = \
            claims, client, report, name, retry_later
        self.tracker = tracker
        self.control = control
        self.loading = threading.Lock()
        self.changed = threading.Condition()  # over on_wire, stopped, halted and the report
        self.on_wire: list[Claim] = []
        self.stopped = False
        self.halted = False

    def work(self) -> None:
        try:
            while (claim := self._take()) is not None:
                with self.control.on_wire():
                    outcomes = self.client.send(claim.batch)
                with self.changed:
                    if not _tally(self.report, outcomes, self.name):
                        self.stopped = True
                        self.halted = self.halted or any(o.halt for o in outcomes)
                    report = self.report
                    if self.tracker is not None:
                        self.tracker.update(report.sent + report.failed + report.deferred)
                self.claims.finish(claim, outcomes, self.retry_later)
                with self.changed:
                    self.on_wire.remove(claim)
                    self.changed.notify_all()
        except BaseException:
            with self.changed:
                self.stopped = True
                self.changed.notify_all()
            raise

    def _take(self) -> Claim | None:
        with self.loading:
            if self.stopped:
                return None
            reason = self.control.reason()
            if reason is not None:
                with self.changed:
                    self.stopped = True
                    self.report.error = self.report.error or \
                        f"destination {self.name!r}: drain paused ({reason})"
                    self.report.paused = True
                return None
            claim = self.claims.next()
            with self.changed:
                if claim.batch:
                    self.changed.wait_for(lambda: self.stopped or all(
                        claim.users.isdisjoint(other.users) for other in self.on_wire))
                if claim.batch and not self.stopped:
                    self.on_wire.append(claim)
                    return claim
                self.stopped = True  # nothing left to send, or told to stop
            self.claims.finish(claim, [], self.retry_later)
            return None


def _drain_destination(store: Store, config: Config, name: str, leases: list[Lease],
                       clients: Mapping[str, Destination] | None, clock: Clock,
                       report: DestinationReport, control: DrainControl,
                       progress: ProgressFactory | None = None) -> None:
    settings = config.destinations[name]
    retry_later = (DEFAULT_RETRY_LATER if isinstance(settings, JsonlConfig)
                   else settings.retry_later)
    injected = clients is not None and name in clients
    # Every drain of a destination, daemon or CLI, takes its requests from the one budget in
    # the state store: a CLI sync beside a daemon must not double the destination's rate.
    client = clients[name] if clients is not None and injected else \
        make_destination(name, settings, limiter=shared_limiter(store, name, settings),
                         space=config.space or store.space_id(),
                         fields=StoredFields(store, name))
    # A destination may keep several claims on the wire at once (`window`): each claim's
    # outcomes commit as soon as it is answered, while the others keep the destination busy.
    window = max(1, client.window)
    claims = Claims(store, name, lambda: _claim_size(client), leases, clock)
    tracker = progress(name, count_pending(store, name, claims.comp_ids)) \
        if progress is not None else None
    pipeline = _Pipeline(claims, client, report, name, retry_later, control, tracker)
    try:
        if window == 1:
            pipeline.work()
        else:
            with ThreadPoolExecutor(window, thread_name_prefix=f"send-{name}") as workers:
                for worker in [workers.submit(pipeline.work) for _ in range(window)]:
                    worker.result()
    finally:
        if tracker is not None:
            tracker.close()
        claims.abandon()
        wire = client.stats.take()
        report.requests += wire["requests"]
        report.retries += wire["retries"]
        report.throttled += wire["throttled"]
        if not injected:
            client.close()
    if report.deferred or report.error or pipeline.halted:
        report.waiting = count_pending(store, name, claims.comp_ids)
    if pipeline.halted:
        report.error = f"{report.error}; {report.waiting} deliveries kept pending"


def _claim_size(client: Destination) -> int:
    """The destination's preferred claim (`claim_size`, e.g. about one request's worth of
    messages), within its `max_batch`."""
    return max(1, min(client.claim_size, client.max_batch))


_OK, _PERMANENT = operator.itemgetter(1), operator.itemgetter(2)  # Outcome.ok, .permanent


def _tally(report: DestinationReport, outcomes: list[Outcome], name: str) -> bool:
    """Count a batch's outcomes; False when the destination should stop for this drain."""
    sent = sum(map(_OK, outcomes))
    report.sent += sent
    if sent == len(outcomes):
        return True
    report.failed += sum(map(_PERMANENT, outcomes))
    deferred = [o for o in outcomes if not o.ok and not o.permanent and not o.halt]
    report.deferred += len(deferred)
    if deferred:
        report.reason = deferred[-1].error
    halted = next((o for o in outcomes if o.halt), None)
    if halted is not None:
        report.error = halted.error or f"destination {name!r} refused the credentials; stopped"
        return False
    if deferred and not sent:
        # Nothing got through after every retry: the destination is down; try next drain.
        log.warning("destination %s unavailable (%s); %d deliveries wait for the next drain",
                    name, deferred[0].error, len(deferred))
        return False
    return True
