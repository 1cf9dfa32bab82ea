"""Per-audience leases in the computations table: owner, expiry, and a fencing token.

Every grant increments the audience's fencing token. A run commits only while the token it was
granted is still current (runner: `WHERE fencing_token = :token`), so a holder that paused past
its expiry and lost the lease to another process cannot commit. Each grant is one conditional
UPDATE: atomic under SQLite's write lock (BEGIN IMMEDIATE) and under PostgreSQL's row lock.

Expiry is compared with the caller's clock (`at=`): hosts sharing a store need synchronised
clocks (NTP), with a skew far below the lease TTL.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from types import TracebackType

from audience_sync.clock import Clock, utcnow
from audience_sync.errors import LeaseBusy, LeaseLost, StoreError
from audience_sync.state.leases import Holder, Lease, grant, holder, release, renew
from audience_sync.state.store import Store

log = logging.getLogger(__name__)

# Long enough to ride out a stalled database or a GC pause; renewed every third of it.
DEFAULT_TTL = timedelta(seconds=60)
# How often a waiting acquirer looks again.
WAIT_POLL_SECONDS = 0.5


def default_owner() -> str:
    """host:pid:random: unique per process, and says where the holder runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def holder_is_dead(owner: str | None) -> bool:
    """True only for an owner of the default form on this host whose process has exited.

    Owners from other hosts, or of another form (a fixed --owner), are never judged: their
    leases expire by themselves.
    """
    parts = (owner or "").split(":")
    if len(parts) < 3:
        return False
    # default_owner() is host:pid:random, possibly behind a prefix such as "cli:".
    host, pid_text = parts[-3], parts[-2]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def try_acquire(store: Store, key: str, owner: str, *, ttl: timedelta,
                at: datetime) -> Lease | None:
    """Take the audience's lease if it is free, expired, already this owner's, or held by a
    process on this host that died; else None.

    The same owner may take it again (a restarted process with a fixed --owner need not wait for
    its old lease to expire); the new grant gets a new token, which fences the old one.
    """
    return grant(store, key, owner, ttl=ttl, at=at, holder_is_dead=holder_is_dead)


def acquire(store: Store, key: str, owner: str, *, ttl: timedelta, clock: Clock,
            wait: bool = True, on_wait: Callable[[Holder], None] | None = None,
            cancelled: threading.Event | None = None,
            max_wait: float | None = None) -> Lease:
    """Take the lease, waiting (at most `max_wait` seconds, when given) for the holder to
    release it or let it expire.

    :raises LeaseBusy: wait is False (or the wait was cancelled or ran out) and another owner
        holds it.
    """
    told = False
    deadline = None if max_wait is None else time.monotonic() + max_wait
    while True:
        lease = try_acquire(store, key, owner, ttl=ttl, at=clock())
        if lease is not None:
            return lease
        current = holder(store, key)
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if not wait or out_of_time or (cancelled is not None and cancelled.is_set()):
            until = f" until {current.expires_at.isoformat()}" if current.expires_at else ""
            waited = f" (gave up after waiting {max_wait:g}s)" if out_of_time else ""
            raise LeaseBusy(f"{key}: {current.owner or 'another process'} holds the lease"
                            f"{until}{waited}")
        if not told and on_wait is not None:
            on_wait(current)
            told = True
        pause = WAIT_POLL_SECONDS if deadline is None else \
            max(0.0, min(WAIT_POLL_SECONDS, deadline - time.monotonic()))
        if cancelled is not None:
            cancelled.wait(pause)
        else:
            threading.Event().wait(pause)


class Renewer:
    """A thread renewing a lease every third of its TTL while a run works.

    `lost` is set when a renewal finds the lease taken over; the run's commit then fails on the
    fencing check anyway, this only lets the holder notice early and log it.
    """

    def __init__(self, store: Store, lease: Lease, *, ttl: timedelta, clock: Clock) -> None:
        self.store = store
        self.lease = lease
        self.ttl = ttl
        self.clock = clock
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{lease.key}",
                                        daemon=True)

    def __enter__(self) -> Renewer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        interval = self.ttl.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                self.lease = renew(self.store, self.lease, ttl=self.ttl, at=self.clock())
            except LeaseLost as exc:
                log.warning("%s", exc.message)
                self.lost.set()
                return
            except StoreError as exc:  # a blip: the next renewal may succeed before expiry
                log.warning("%s: lease renewal failed: %s", self.lease.key, exc.message)


@contextmanager
def held(store: Store, lease: Lease, *, ttl: timedelta, clock: Clock) -> Iterator[Renewer]:
    """Keep the lease renewed while the block runs, then release it."""
    try:
        with Renewer(store, lease, ttl=ttl, clock=clock) as renewer:
            yield renewer
    finally:
        try:
            release(store, lease)
        except StoreError as exc:  # it expires by itself
            log.warning("%s: could not release the lease: %s", lease.key, exc.message)


def hold_all(stack: ExitStack, store: Store, keys: Iterable[str], owner: str, *,
             ttl: timedelta = DEFAULT_TTL, clock: Clock = utcnow, wait: bool = True,
             on_wait: Callable[[str, Holder], None] | None = None,
             max_wait: float | None = None) -> list[Lease]:
    """Take the leases of several audiences and keep them renewed until `stack` closes.

    In key order, so two processes taking overlapping sets never wait on each other in a
    circle. :raises LeaseBusy: wait is False and another owner holds one of them.
    """
    leases: list[Lease] = []
    for key in sorted(set(keys)):
        def tell(current: Holder, key: str = key) -> None:
            if on_wait is not None:
                on_wait(key, current)

        lease = acquire(store, key, owner, ttl=ttl, clock=clock, wait=wait, on_wait=tell,
                        max_wait=max_wait)
        stack.enter_context(held(store, lease, ttl=ttl, clock=clock))
        leases.append(lease)
    return leases


__all__ = [
    "DEFAULT_TTL",
    "Holder",
    "Lease",
    "Renewer",
    "acquire",
    "default_owner",
    "held",
    "hold_all",
    "holder",
    "holder_is_dead",
    "release",
    "renew",
    "try_acquire",
]
