"""Lease and rate-slot SQL on the state database (the lease logic is leases.py; the rate
limiter ratelimit.py).

Every grant increments the audience's fencing token. A run commits only while the token it was
granted is still current (state/apply.py: `WHERE fencing_token = :token`). Each grant is one
conditional UPDATE: atomic under SQLite's write lock (BEGIN IMMEDIATE) and under PostgreSQL's
row lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Float, func, insert, literal, or_, select, update

from audience_sync.errors import LeaseLost, StoreError
from audience_sync.state import schema as t
from audience_sync.state.store import Store

log = logging.getLogger("audience_sync.leases")


@dataclass(frozen=True)
class Lease:
    key: str
    computation_id: int
    owner: str
    token: int
    expires_at: datetime


@dataclass(frozen=True)
class Holder:
    owner: str | None
    expires_at: datetime | None


def grant(store: Store, key: str, owner: str, *, ttl: timedelta, at: datetime,
          holder_is_dead: Callable[[str | None], bool]) -> Lease | None:
    """Take the audience's lease if it is free, expired, or already this owner's; else None.

    The same owner may take it again (a restarted process with a fixed --owner need not wait for
    its old lease to expire); the new grant gets a new token, which fences the old one.
    """
    c = t.computations
    expires = at + ttl
    with store.write() as conn:
        row = conn.execute(
            update(c)
            .where(c.c.key == key, or_(c.c.lease_owner.is_(None), c.c.lease_expires_at <= at,
                                       c.c.lease_owner == owner))
            .values(lease_owner=owner, lease_expires_at=expires,
                    fencing_token=c.c.fencing_token + 1)
            .returning(c.c.id, c.c.fencing_token)
        ).first()
        if row is None:
            current = conn.execute(select(c.c.id, c.c.lease_owner).where(c.c.key == key)).first()
            if current is None:
                raise StoreError(f"{key}: not registered in the state database")
            if not holder_is_dead(current.lease_owner):
                return None
            # A process on this host that died (SIGKILL, OOM) without releasing its lease:
            # take it over now rather than wait out the TTL. The new token fences the old one.
            log.info("%s: taking over the lease of %s, which is no longer running", key,
                     current.lease_owner)
            row = conn.execute(
                update(c).where(c.c.key == key, c.c.lease_owner == current.lease_owner)
                .values(lease_owner=owner, lease_expires_at=expires,
                        fencing_token=c.c.fencing_token + 1)
                .returning(c.c.id, c.c.fencing_token)).first()
            if row is None:
                return None
    return Lease(key=key, computation_id=int(row.id), owner=owner, token=int(row.fencing_token),
                 expires_at=expires)


def holder(store: Store, key: str) -> Holder:
    c = t.computations
    with store.read() as conn:
        row = conn.execute(select(c.c.lease_owner, c.c.lease_expires_at)
                           .where(c.c.key == key)).first()
    return Holder(None, None) if row is None else Holder(row.lease_owner, row.lease_expires_at)


def renew(store: Store, lease: Lease, *, ttl: timedelta, at: datetime) -> Lease:
    """Push the expiry out.

    :raises LeaseLost: the token is no longer current (expired and taken by another owner).
    """
    c = t.computations
    expires = at + ttl
    with store.write() as conn:
        updated = conn.execute(
            update(c).where(c.c.id == lease.computation_id, c.c.fencing_token == lease.token,
                            c.c.lease_owner == lease.owner)
            .values(lease_expires_at=expires)).rowcount
    if updated != 1:
        raise LeaseLost(f"{lease.key}: lease {lease.token} of {lease.owner} was taken over")
    return Lease(lease.key, lease.computation_id, lease.owner, lease.token, expires)


def release(store: Store, lease: Lease) -> bool:
    """Give the lease up if it is still ours; False if it had been taken over already."""
    c = t.computations
    with store.write() as conn:
        updated = conn.execute(
            update(c).where(c.c.id == lease.computation_id, c.c.fencing_token == lease.token)
            .values(lease_owner=None, lease_expires_at=None)).rowcount
    return updated == 1


# -- rate slots: the shared request budget of a destination (ratelimit.py) ------------------


def ensure_rate_budget(store: Store, destination: str) -> None:
    """The destination's row in rate_budgets, created if missing."""
    b = t.rate_budgets
    try:
        with store.write() as conn:
            if conn.execute(select(b.c.destination)
                            .where(b.c.destination == destination)).first() is None:
                conn.execute(insert(b).values(destination=destination, next_free=0.0))
    except StoreError:
        pass  # another daemon created it at the same moment


def take_rate_slots(store: Store, destination: str, earliest: float, slots: int,
                    interval: float) -> float:
    """next_free = max(next_free, earliest) + slots * interval, in one statement (one round
    trip); the wall-clock start of the slots taken."""
    b = t.rate_budgets
    greatest = func.greatest if store.dialect == "postgresql" else func.max
    after = greatest(b.c.next_free, literal(earliest, Float(precision=53))) + slots * interval
    with store.write() as conn:
        end = conn.execute(update(b).where(b.c.destination == destination)
                           .values(next_free=after).returning(b.c.next_free)).scalar_one()
    return float(end) - slots * interval


class StoreSlots:
    """A rate limiter's slot source in the state store (ratelimit.RateLimiter)."""

    def __init__(self, store: Store, destination: str) -> None:
        self.store = store
        self.destination = destination
        ensure_rate_budget(store, destination)

    def take(self, earliest: float, slots: int, interval: float) -> float:
        return take_rate_slots(self.store, self.destination, earliest, slots, interval)
