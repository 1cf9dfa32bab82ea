"""Leases with fencing, on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from audience_sync.config import Config, load_config
from audience_sync.errors import LeaseBusy, LeaseLost
from audience_sync.leases import (
    Holder,
    Renewer,
    acquire,
    default_owner,
    held,
    holder,
    holder_is_dead,
    release,
    renew,
    try_acquire,
)
from audience_sync.runner import run_computation
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.helpers import make_warehouse, write_config

T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
TTL = timedelta(seconds=30)


@pytest.fixture
def config(tmp_path: Path, state_url: str) -> Config:
    users = [(f"u{i}", f"u{i}@example.com", f"User {i}", None, None, float(i)) for i in range(50)]
    source = make_warehouse(tmp_path / "warehouse.db", users)
    path = write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"warehouse": {"url": source}},
        "destinations": {"file": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}},
        "audiences": [{"name": "Scored", "source": "warehouse",
                       "query": "SELECT id AS user_id, email FROM users WHERE score >= 10",
                       "destinations": ["file"]}],
    })
    return load_config(path)


@pytest.fixture
def store(config: Config) -> Iterator[Store]:
    store = Store(config.state_db)
    store.upgrade()
    store.register(config.computations, T0)
    yield store
    store.dispose()


def test_every_grant_increments_the_fencing_token(store: Store) -> None:
    first = try_acquire(store, "scored", "a", ttl=TTL, at=T0)
    assert first is not None and first.owner == "a"
    assert try_acquire(store, "scored", "b", ttl=TTL, at=T0 + timedelta(seconds=29)) is None
    assert holder(store, "scored") == Holder("a", T0 + TTL)
    second = try_acquire(store, "scored", "b", ttl=TTL, at=T0 + TTL)
    assert second is not None and second.token == first.token + 1
    assert release(store, second)
    third = try_acquire(store, "scored", "c", ttl=TTL, at=T0 + TTL)
    assert third is not None and third.token == second.token + 1


def test_the_same_owner_may_take_its_lease_again_with_a_new_token(store: Store) -> None:
    first = try_acquire(store, "scored", "daemon-1", ttl=TTL, at=T0)
    again = try_acquire(store, "scored", "daemon-1", ttl=TTL, at=T0 + timedelta(seconds=1))
    assert first is not None and again is not None and again.token == first.token + 1
    with pytest.raises(LeaseLost):
        renew(store, first, ttl=TTL, at=T0 + timedelta(seconds=2))


def test_renew_pushes_expiry_and_fails_once_taken_over(store: Store) -> None:
    lease = try_acquire(store, "scored", "a", ttl=TTL, at=T0)
    assert lease is not None
    lease = renew(store, lease, ttl=TTL, at=T0 + timedelta(seconds=20))
    assert lease.expires_at == T0 + timedelta(seconds=50)
    assert try_acquire(store, "scored", "b", ttl=TTL, at=T0 + timedelta(seconds=40)) is None
    thief = try_acquire(store, "scored", "b", ttl=TTL, at=T0 + timedelta(seconds=50))
    assert thief is not None
    with pytest.raises(LeaseLost, match="taken over"):
        renew(store, lease, ttl=TTL, at=T0 + timedelta(seconds=51))
    # Releasing a lost lease leaves the new holder's lease alone.
    assert not release(store, lease)
    assert holder(store, "scored").owner == "b"


def test_acquire_without_wait_says_who_holds_the_lease(store: Store) -> None:
    assert try_acquire(store, "scored", "daemon@host-1", ttl=TTL, at=T0) is not None
    with pytest.raises(LeaseBusy, match="daemon@host-1 holds the lease"):
        acquire(store, "scored", "cli", ttl=TTL, clock=lambda: T0, wait=False)


def test_acquire_waits_for_release(store: Store) -> None:
    first = try_acquire(store, "scored", "a", ttl=TTL, at=T0)
    assert first is not None
    waited: list[Holder] = []

    def on_wait(current: Holder) -> None:
        waited.append(current)
        release(store, first)  # the holder finishes while we wait

    lease = acquire(store, "scored", "b", ttl=TTL, clock=lambda: T0, on_wait=on_wait)
    assert lease.owner == "b" and lease.token == first.token + 1
    assert waited == [Holder("a", T0 + TTL)]


def test_renewer_keeps_the_lease_alive_then_release_frees_it(store: Store) -> None:
    now = [T0]
    ttl = timedelta(seconds=0.3)
    lease = try_acquire(store, "scored", "a", ttl=ttl, at=now[0])
    assert lease is not None
    with held(store, lease, ttl=ttl, clock=lambda: now[0]) as renewer:
        now[0] = T0 + timedelta(hours=1)
        deadline = threading.Event()
        for _ in range(200):  # bounded: renewals every 0.1s
            if (holder(store, "scored").expires_at or T0) > T0 + timedelta(minutes=30):
                break
            deadline.wait(0.05)
        assert holder(store, "scored").expires_at == now[0] + ttl
        assert not renewer.lost.is_set()
    assert holder(store, "scored") == Holder(None, None)


def test_renewer_notices_a_lost_lease(store: Store) -> None:
    ttl = timedelta(seconds=0.3)
    lease = try_acquire(store, "scored", "a", ttl=ttl, at=T0)
    assert lease is not None
    assert try_acquire(store, "scored", "b", ttl=ttl, at=T0 + ttl) is not None
    with Renewer(store, lease, ttl=ttl, clock=lambda: T0 + ttl) as renewer:
        assert renewer.lost.wait(10)


def _counts(store: Store) -> tuple[int, int, int]:
    with store.read() as conn:
        return (conn.execute(select(func.count()).select_from(t.runs)).scalar_one(),
                conn.execute(select(func.count()).select_from(t.members)).scalar_one(),
                conn.execute(select(func.count()).select_from(t.deliveries)).scalar_one())


def test_a_holder_paused_past_expiry_cannot_commit(store: Store, config: Config) -> None:
    """A's run pauses mid-snapshot; its lease expires; B takes it and runs; A cannot commit."""
    comp = config.computations[0]
    a = try_acquire(store, comp.key, "daemon-a", ttl=TTL, at=T0)
    assert a is not None
    paused, resume = threading.Event(), threading.Event()

    def pause(_rows: int) -> None:
        paused.set()
        assert resume.wait(30)

    outcome: list[BaseException | None] = []

    def run_a() -> None:
        try:
            run_computation(store, config, comp, fencing_token=a.token, progress=pause)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_a)
    thread.start()
    assert paused.wait(30)
    # A is frozen inside its run; its lease expires; B is granted it and runs to completion.
    b = try_acquire(store, comp.key, "daemon-b", ttl=TTL, at=T0 + TTL + timedelta(seconds=1))
    assert b is not None and b.token > a.token
    result_b = run_computation(store, config, comp, fencing_token=b.token)
    assert result_b.status == "succeeded" and result_b.entered == 40
    before = _counts(store)
    resume.set()
    thread.join(60)
    assert isinstance(outcome[0], LeaseLost)
    assert _counts(store) == before  # nothing of A's run committed
    with store.read() as conn:
        tokens = conn.execute(select(t.runs.c.fencing_token)).scalars().all()
    assert tokens == [b.token]


def test_a_run_with_a_stale_token_after_renewals_elsewhere_cannot_commit(
        store: Store, config: Config) -> None:
    comp = config.computations[0]
    stale = try_acquire(store, comp.key, "a", ttl=TTL, at=T0)
    assert stale is not None
    current = try_acquire(store, comp.key, "b", ttl=TTL, at=T0 + TTL)
    assert current is not None
    with pytest.raises(LeaseLost):
        run_computation(store, config, comp, fencing_token=stale.token)
    assert _counts(store) == (0, 0, 0)


def test_only_one_of_many_concurrent_acquirers_wins(store: Store) -> None:
    winners: list[str] = []
    barrier = threading.Barrier(6)

    def contend(name: str) -> Callable[[], None]:
        def go() -> None:
            barrier.wait()
            if try_acquire(store, "scored", name, ttl=TTL, at=T0) is not None:
                winners.append(name)
        return go

    threads = [threading.Thread(target=contend(f"p{i}")) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(winners) == 1
    assert holder(store, "scored").owner == winners[0]


def test_a_dead_local_holder_is_taken_over_at_once(store: Store) -> None:
    """A CLI run killed with SIGKILL must not block the next one for a whole TTL."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = f"cli:{socket.gethostname()}:{proc.pid}:abc123"
    alive = f"{socket.gethostname()}:1:abc123"  # pid 1 is always running
    elsewhere = f"other-host:{proc.pid}:abc123"
    for owner, taken in ((alive, False), (elsewhere, False), ("fixed-name", False),
                         (dead, True)):
        first = try_acquire(store, "scored", owner, ttl=TTL, at=T0)
        assert first is not None
        second = try_acquire(store, "scored", default_owner(), ttl=TTL,
                             at=T0 + timedelta(seconds=1))
        assert (second is not None) == taken, owner
        if second is not None:
            assert second.token == first.token + 1
            assert holder_is_dead(dead) and not holder_is_dead(alive)
        assert release(store, second or first)
