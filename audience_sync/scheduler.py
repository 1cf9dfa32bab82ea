"""The daemon: APScheduler 3.x is the clock; each tick runs the due audiences, then drains.

One recurring tick job (coalesce, max_instances=1, no misfire grace limit: a late tick still
runs, and missed ticks collapse into one). A tick reads the clock, asks cadence which audiences
are due, and for each takes its lease, runs it with the fencing token and drains its outbox
under the same lease; then it drains the other audiences with pending deliveries. Audiences
whose lease another process (a daemon, a CLI `sync`) holds are skipped until a later tick.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from audience_sync.alerts import AlertSender, notify_drain, notify_run
from audience_sync.cadence import Cadence, due_keys, is_due
from audience_sync.clock import Clock, duration, utcnow
from audience_sync.config import Computation, Config
from audience_sync.destinations import Destination, make_destination
from audience_sync.drain import DrainControl, DrainReport, drain
from audience_sync.errors import AudienceSyncError, LeaseLost
from audience_sync.leases import DEFAULT_TTL, Lease, Renewer, held, try_acquire
from audience_sync.ratelimit import shared_limiter
from audience_sync.runner import RunResult, run_computation
from audience_sync.state import queries
from audience_sync.state.fields import StoredFields
from audience_sync.state.housekeeping import claim_daily, prune_deliveries
from audience_sync.state.store import Store
from audience_sync.states import InitialState

log = logging.getLogger("audience_sync.daemon")


# How long one tick drains one audience before moving on: a long initial sync at a vendor's
# rate limit must not starve the other audiences; it resumes on the next tick.
DEFAULT_DRAIN_SLICE = timedelta(seconds=30)
# On SIGTERM the batch in flight gets this long to be answered; then its requests are
# interrupted (their deliveries stay pending), and if one is still on the wire STOP_LIMIT
# later (a connect to a silent host), the process exits without it: within 5 s in all.
STOP_GRACE = 2.0
STOP_LIMIT = 2.0


class Observer:
    """What the daemon reports as it works (health.Metrics implements it)."""

    def tick_started(self) -> None: ...
    def tick_finished(self, ok: bool) -> None: ...
    def progress(self) -> None: ...
    def run_finished(self, result: RunResult) -> None: ...
    def drained(self, report: DrainReport) -> None: ...


@dataclass
class DaemonOptions:
    owner: str
    lease_ttl: timedelta = DEFAULT_TTL
    drain_slice: timedelta = DEFAULT_DRAIN_SLICE
    # Take every request's slot from the destination's budget in the state store, so several
    # daemons, and CLI drains beside them, together keep its rate limit (on SQLite too: a CLI
    # sync runs beside the daemon). False: this process's own limiter, for a daemon that is
    # certain to drain alone.
    shared_budget: bool = True


@dataclass
class _DrainGate:
    """Why the current audience's drain should stop before its next batch, if it should."""

    stopping: threading.Event
    deadline: float = 0.0
    renewer: Renewer | None = None
    tripped: list[str] = field(default_factory=list)

    def reason(self) -> str | None:
        if self.stopping.is_set():
            why = "stopping"
        elif self.renewer is not None and self.renewer.lost.is_set():
            why = "lease lost"
        elif time.monotonic() >= self.deadline:
            why = "slice used up; resumes next tick"
        else:
            return None
        self.tripped.append(why)
        return why


# A destination that stopped for a reason of its own (credentials refused, a request it cannot
# build, a file it cannot write) is rebuilt after this pause: a passing 401 must not stop it
# until the daemon restarts, and a lasting one costs a request per pause, not per tick.
STOPPED_DESTINATION_RETRY = timedelta(minutes=5)


class Daemon:
    def __init__(self, store: Store, config: Config, options: DaemonOptions, *,
                 clock: Clock = utcnow, observer: Observer | None = None) -> None:
        self.store = store
        self.config = config
        self.options = options
        self.clock = clock
        self.observer = observer or Observer()
        self.stopping = threading.Event()
        self._gate = _DrainGate(self.stopping)
        # The drains' stop signal, checked before each claim (the batch in flight finishes).
        self._control = DrainControl(self._gate.reason, self.observer.progress)
        self._clients: dict[str, Destination] = {}
        # Destinations that stopped, and when their client is rebuilt.
        self._rebuild_at: dict[str, datetime] = {}
        self._space_id: str | None = None
        self._comps: Mapping[str, Computation] = {c.key: c for c in config.computations}
        self._alerts = AlertSender() if config.alerts else None
        self._next_prune_check: datetime | None = None
        self._cadences = {c.key: Cadence(c.every, c.jitter) for c in config.computations}

    # -- one tick --------------------------------------------------------------------------

    def tick(self) -> None:
        """Run every due audience this process can lease, then drain what is pending."""
        self.observer.tick_started()
        ok = False
        try:
            at = self.clock()
            for key in due_keys(self.store.computations(), self._cadences, at):
                if self.stopping.is_set():
                    break
                self._run(self._comps[key])
            for key in self._keys_with_pending():
                if self.stopping.is_set():
                    break
                self._drain_leased(self._comps[key])
            if not self.stopping.is_set():
                self._prune()
            ok = True
        except AudienceSyncError as exc:
            log.error("tick failed: %s", exc.message)
        except Exception:
            log.exception("tick failed")
        finally:
            self.observer.tick_finished(ok)

    def _lease(self, comp: Computation) -> Lease | None:
        return try_acquire(self.store, comp.key, self.options.owner,
                           ttl=self.options.lease_ttl, at=self.clock())

    def _run(self, comp: Computation) -> None:
        lease = self._lease(comp)
        if lease is None:
            log.debug("%s: due, but another process holds the lease", comp.key)
            return
        with held(self.store, lease, ttl=self.options.lease_ttl, clock=self.clock) as renewer:
            # The lease holder before us (a CLI sync, another daemon) may have just run it.
            row = self.store.computation(comp.key)
            if row is None or not is_due(row, self._cadences[comp.key], self.clock()):
                return
            try:
                result = run_computation(self.store, self.config, comp,
                                         fencing_token=lease.token, clock=self.clock,
                                         progress=lambda _n: self.observer.progress())
            except LeaseLost as exc:
                log.warning("%s", exc.message, extra=_fields(audience=comp.key))
                return
            _log_run(result)
            notify_run(self.store, self.config, result, self._alerts, self.clock())
            self.observer.run_finished(result)
            self._drain(comp, renewer)

    def _drain_leased(self, comp: Computation) -> None:
        lease = self._lease(comp)
        if lease is None:
            return
        with held(self.store, lease, ttl=self.options.lease_ttl, clock=self.clock) as renewer:
            self._drain(comp, renewer)

    def _drain(self, comp: Computation, renewer: Renewer) -> None:
        clients = self._clients_for(comp)
        if clients is None:
            return
        self._gate.renewer = renewer
        self._gate.deadline = time.monotonic() + self.options.drain_slice.total_seconds()
        self._gate.tripped.clear()
        # Under the lease this tick holds: the drain stops if it is taken over.
        report = drain(self.store, self.config, [renewer.lease], clients=clients,
                       clock=self.clock, control=self._control)
        self.observer.drained(report)
        for name, dest in report.destinations.items():
            if dest.error and not dest.paused and name not in self._rebuild_at:
                self._rebuild_at[name] = self.clock() + STOPPED_DESTINATION_RETRY
                log.warning("destination %s stopped (%s); it is tried again at %s", name,
                            dest.error, self._rebuild_at[name].isoformat(),
                            extra=_fields(destination=name))
        notify_drain(self.store, self.config, report, [comp.key], self._alerts, self.clock())
        paused = bool(self._gate.tripped)
        progress = self._initial_progress(comp)
        for name, dest in report.destinations.items():
            if dest.sent or dest.failed or (dest.error and not paused):
                # Per slice: what it did, then where the initial sync stands (sent/total,
                # percent, the rate over the last minutes, ETA): a 6-hour sync is followable.
                where, fields = _progress_text(progress)
                log.info("%s -> %s: %d sent, %d failed, %d to retry this slice%s%s", comp.key,
                         name, dest.sent, dest.failed, dest.deferred, where,
                         f" ({dest.error})" if dest.error else "",
                         extra=_fields(audience=comp.key, destination=name, sent=dest.sent,
                                       failed=dest.failed, deferred=dest.deferred, **fields))

    def _initial_progress(self, comp: Computation) -> queries.Progress | None:
        row = self.store.computation(comp.key)
        if row is None or row.initial_state != InitialState.DELIVERING:
            return None
        return queries.initial_progress(self.store, row.id, self.clock())

    def _space(self) -> str:
        if self.config.space is not None:
            return self.config.space
        if self._space_id is None:
            self._space_id = self.store.space_id()
        return self._space_id

    def _clients_for(self, comp: Computation) -> dict[str, Destination] | None:
        now = self.clock()
        for name in comp.destinations:
            if name in self._rebuild_at and now >= self._rebuild_at[name]:
                del self._rebuild_at[name]
                stopped = self._clients.pop(name, None)
                if stopped is not None:
                    stopped.close()
            if name not in self._clients:
                settings = self.config.destinations[name]
                shared = self.options.shared_budget
                try:
                    limiter = shared_limiter(self.store, name, settings) if shared else None
                    inner = make_destination(name, settings, limiter=limiter,
                                             space=self._space(),
                                             fields=StoredFields(self.store, name))
                except AudienceSyncError as exc:
                    # Only this destination is unusable (its drain reports why); the
                    # audience's other destinations still get their deliveries.
                    log.error("%s", exc.message)
                    continue
                self._clients[name] = inner
        return {name: self._clients[name] for name in comp.destinations
                if name in self._clients}

    def _prune(self) -> None:
        """Once a day (whichever daemon claims it), drop sent and superseded deliveries
        older than `retention`; never pending or failed ones, never history."""
        now = self.clock()
        # Ask the store at most hourly: the claim is a write, and ticks come every 30 s.
        if self._next_prune_check is not None and now < self._next_prune_check:
            return
        self._next_prune_check = now + timedelta(hours=1)
        if not claim_daily(self.store, "prune", now):
            return
        removed = prune_deliveries(self.store, now - self.config.retention)
        log.info("pruned %d sent or superseded deliveries older than %s", removed,
                 self.config.retention, extra=_fields(pruned=removed))

    def _keys_with_pending(self) -> list[str]:
        keys = queries.keys_with_due_pending(self.store, self.clock())
        return [key for key in self._comps if key in keys]

    def close(self) -> None:
        if self._alerts is not None:
            self._alerts.close(wait=1.0)  # SIGTERM must exit within seconds
        for client in self._clients.values():
            try:
                client.close()
            except Exception:  # closing is best effort at shutdown
                log.exception("closing %s failed", client.name)
        self._clients.clear()

    # -- the long-lived process ----------------------------------------------------------------

    def serve(self, *, install_signals: bool = True) -> int:
        """Tick until SIGTERM/SIGINT; finish the batch in flight, release leases; 0 when clean."""
        if install_signals:
            self._install_signals()
        tick = self.config.schedule.tick
        scheduler = BackgroundScheduler(timezone=UTC)
        scheduler.add_job(self.tick, IntervalTrigger(seconds=tick.total_seconds(), timezone=UTC),
                          id="tick", name="tick", coalesce=True, max_instances=1,
                          misfire_grace_time=None, next_run_time=datetime.now(UTC))
        log.info("daemon %s started: %d audiences and traits, tick %ss, state %s",
                 self.options.owner, len(self._comps), tick.total_seconds(), self.store.dialect,
                 extra=_fields(owner=self.options.owner))
        scheduler.start()
        try:
            while not self.stopping.wait(1.0):
                pass
        finally:
            self._stop(scheduler)
            self.close()
        log.info("daemon %s stopped", self.options.owner)
        return 0

    def _stop(self, scheduler: BackgroundScheduler) -> None:
        """Wait for the tick in flight (it stops between batches and releases its leases),
        interrupting its requests after STOP_GRACE; never longer than STOP_GRACE + STOP_LIMIT
        for the wire (a run that is committing is waited for)."""
        closer = threading.Thread(target=scheduler.shutdown, kwargs={"wait": True},
                                  name="stop", daemon=True)
        closer.start()
        closer.join(STOP_GRACE)
        if closer.is_alive():
            log.info("stopping: interrupting the requests still on the wire (their deliveries "
                     "stay pending)")
            for client in list(self._clients.values()):
                client.interrupt()
            closer.join(STOP_LIMIT)
        if closer.is_alive() and self._control.sending:
            # Stuck on the wire (a connect to a silent host): exit without it. Its claim
            # never committed, so what it was sending stays pending.
            log.warning("stopping: a request did not end within %.0fs; exiting without it",
                        STOP_GRACE + STOP_LIMIT)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(0)
        # Not on the wire (a run committing): wait for it, as before.
        closer.join()

    def _install_signals(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self.stopping.is_set():
                log.warning("%s again: exiting at once", name)
                os._exit(128 + signum)
            log.info("%s: finishing the batch in flight, then exiting (again to exit at once)",
                     name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)


def _fields(**values: Any) -> dict[str, Any]:
    """Structured fields for the JSON log format."""
    return {"fields": values}


def _progress_text(progress: queries.Progress | None) -> tuple[str, dict[str, Any]]:
    if progress is None:
        return "", {}
    percent = 100 * progress.done / progress.total if progress.total else 100.0
    rate = f", {progress.rate:,.1f}/s over the last minutes" if progress.rate else ""
    eta = f", ETA {duration(progress.eta_seconds)}" if progress.eta_seconds else ""
    return (f"; initial sync {progress.done:,}/{progress.total:,} delivered ({percent:.0f}%)"
            f"{rate}{eta}",
            {"done": progress.done, "total": progress.total, "rate": progress.rate,
             "eta_seconds": progress.eta_seconds})


def _log_run(result: RunResult) -> None:
    line = (f"{result.key}: {result.kind} run {result.status}: {result.members} members "
            f"+{result.entered} -{result.exited} ~{result.changed}, {result.queued} queued "
            f"in {result.seconds:.2f}s")
    fields = _fields(audience=result.key, kind=result.kind, status=result.status,
                     run_id=result.run_id, members=result.members, entered=result.entered,
                     exited=result.exited, changed=result.changed, queued=result.queued,
                     seconds=round(result.seconds, 3))
    # The runner logs the human summary line; this one carries the fields for JSON logs.
    log.debug("%s", line, extra=fields)
