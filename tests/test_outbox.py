"""The outbox drain on SQLite and PostgreSQL: claims, outcomes, supersession, retries, threads.

Destinations here are small in-test implementations of the Destination protocol (no mocks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from audience_sync.clock import Clock, utcnow
from audience_sync.config import Config, load_config
from audience_sync.destinations import Destination, Outcome, SendStats
from audience_sync.drain import DrainControl, DrainReport, drain
from audience_sync.leases import hold_all, try_acquire
from audience_sync.messages import Delivery
from audience_sync.runner import run_computation
from audience_sync.state import schema as t
from audience_sync.state.outbox import requeue_failed
from audience_sync.state.store import Store
from tests.helpers import make_warehouse, set_users, write_config

WAIT = 10.0
USERS = [(f"u{i:03d}", None, None, None, None, 50.0) for i in range(60)]


class Recorder:
    """Acknowledges everything (or answers with `answer`), remembering what it was given."""

    def __init__(self, name: str, max_batch: int = 1000,
                 answer: Callable[[Delivery], Outcome] | None = None,
                 before: Callable[[], None] | None = None) -> None:
        self.name = name
        self.max_batch = max_batch
        self.claim_size = max_batch
        self.window = 1
        self.stats = SendStats()
        self.answer = answer or (lambda d: Outcome(d.id, ok=True))
        self.before = before
        self.batches: list[list[Delivery]] = []
        self.lock = threading.Lock()

    @property
    def sent(self) -> list[Delivery]:
        return [d for batch in self.batches for d in batch]

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        with self.lock:
            self.batches.append(list(batch))
        if self.before is not None:
            self.before()
        return [self.answer(d) for d in batch]

    def check(self) -> tuple[bool, str]:
        return True, "ok"

    def close(self) -> None:
        return None


@pytest.fixture
def setup(tmp_path: Path, state_url: str) -> Iterator[tuple[Store, Config, Path]]:
    warehouse = tmp_path / "warehouse.db"
    make_warehouse(warehouse, USERS)
    path = write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"warehouse": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"a_slow": {"type": "jsonl", "path": str(tmp_path / "a.jsonl")},
                         "b_fast": {"type": "jsonl", "path": str(tmp_path / "b.jsonl")}},
        "audiences": [{"name": "Members", "source": "warehouse",
                       "query": "SELECT id AS user_id FROM users WHERE score > 10",
                       "destinations": ["a_slow", "b_fast"]}],
    })
    config = load_config(path)
    store = Store(config.state_db)
    store.upgrade()
    store.register(config.computations, datetime.now(UTC))
    yield store, config, warehouse
    store.dispose()


def _drain(store: Store, config: Config, keys: list[str] | None = None, *,
           clients: Mapping[str, Destination] | None = None,
           clock: Clock = utcnow) -> DrainReport:
    """A drain under the leases of the audiences (all configured ones by default)."""
    with ExitStack() as stack:
        leases = hold_all(stack, store, keys or [c.key for c in config.computations], "test")
        return drain(store, config, leases, clients=clients, clock=clock)


def _run(store: Store, config: Config) -> None:
    assert run_computation(store, config, config.computations[0]).ok


def _statuses(store: Store, destination: str) -> dict[str, list[str]]:
    d = t.deliveries
    out: dict[str, list[str]] = {}
    with store.read() as conn:
        for row in conn.execute(select(d.c.user_id, d.c.status).where(
                d.c.destination == destination).order_by(d.c.id)):
            out.setdefault(row.user_id, []).append(row.status)
    return out


def test_a_slow_destination_does_not_hold_back_the_others(
        setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    _run(store, config)
    fast_done = threading.Event()
    seen: list[bool] = []
    fast = Recorder("b_fast", before=lambda: fast_done.set())
    slow = Recorder("a_slow", before=lambda: seen.append(fast_done.wait(WAIT)))
    clients: dict[str, Destination] = {"a_slow": slow, "b_fast": fast}
    report = _drain(store, config, clients=clients)
    assert seen and all(seen), "the fast destination waited for the slow one"
    assert report.destinations["a_slow"].sent == report.destinations["b_fast"].sent == 60


class Windowed(Recorder):
    """Takes claims of `claim_size` and keeps up to `window` of them on the wire."""

    def __init__(self, name: str, window: int, claim_size: int,
                 before: Callable[[Sequence[Delivery]], None]) -> None:
        super().__init__(name)
        self.window = window
        self.claim_size = claim_size
        self.hook = before
        self.on_wire: list[list[Delivery]] = []

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        with self.lock:
            self.batches.append(list(batch))
            self.on_wire.append(list(batch))
        try:
            self.hook(batch)
        finally:
            with self.lock:
                self.on_wire.remove(list(batch))
        return [Outcome(d.id, ok=True) for d in batch]


def test_a_window_keeps_several_claims_on_the_wire(setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    _run(store, config)
    second = threading.Event()
    overlapped: list[bool] = []

    def hold_the_first(batch: Sequence[Delivery]) -> None:
        if batch[0].user_id == "u000":
            overlapped.append(second.wait(WAIT))  # the next claim goes out meanwhile
        else:
            second.set()

    windowed = Windowed("b_fast", window=3, claim_size=5, before=hold_the_first)
    report = _drain(store, config, clients={"a_slow": Recorder("a_slow"), "b_fast": windowed})
    assert overlapped == [True]
    assert {len(batch) for batch in windowed.batches} == {5}
    assert report.destinations["b_fast"].sent == 60
    assert set(_statuses(store, "b_fast")) == {u[0] for u in USERS}
    assert all(s == ["sent"] for s in _statuses(store, "b_fast").values())


def test_a_window_never_sends_a_user_while_an_older_value_is_on_the_wire(
        setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    _run(store, config)
    # A newer value for u000 queued behind everyone (as a run committing during the drain
    # would leave it): it must wait until the older one was answered.
    d = t.deliveries
    with store.write() as conn:
        first = conn.execute(select(d).where(d.c.destination == "b_fast", d.c.user_id == "u000"))\
            .one()
        conn.execute(d.insert().values(
            computation_id=first.computation_id, run_id=first.run_id, destination="b_fast",
            user_id="u000", value="false", observed_at=datetime.now(UTC), status="pending"))
    clashes: list[str] = []
    newer_started = threading.Event()
    # How long the older value is held on the wire, waiting for the newer one to (wrongly)
    # go out beside it: a wait for something that must not happen.
    hold = 0.5

    def hold_u000(batch: Sequence[Delivery]) -> None:
        if batch[0].user_id != "u000":
            return
        if batch[0].value == "true":
            newer_started.wait(hold)
        else:
            newer_started.set()
            with windowed.lock:
                wire = [x.user_id for claim in windowed.on_wire for x in claim]
            if wire.count("u000") > 1:
                clashes.append(f"u000 twice on the wire: {wire}")

    windowed = Windowed("b_fast", window=4, claim_size=1, before=hold_u000)
    report = _drain(store, config, clients={"a_slow": Recorder("a_slow"), "b_fast": windowed})
    assert not clashes
    assert report.destinations["b_fast"].sent == 61
    values = [x.value for x in windowed.sent if x.user_id == "u000"]
    assert values == ["true", "false"]


def test_two_drains_never_send_one_row_twice(setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    if store.dialect != "postgresql":
        pytest.skip("SKIP LOCKED claims are PostgreSQL's; SQLite is single-host")
    _run(store, config)
    barrier = threading.Barrier(2, timeout=WAIT)
    first = threading.Event()

    def overlap() -> None:
        # Both drains hold a claim at the same moment once: the second must skip the first's.
        if not first.is_set():
            first.set()
            barrier.wait()
        elif barrier.n_waiting:
            barrier.wait()

    recorders = [Recorder("b_fast", max_batch=7, before=overlap) for _ in range(2)]
    with ExitStack() as stack:
        # One set of leases for both: the row locks alone must keep the drains apart.
        leases = hold_all(stack, store, [c.key for c in config.computations], "test")
        threads = [threading.Thread(target=drain, args=(store, config, leases),
                                    kwargs={"clients": {"b_fast": r,
                                                        "a_slow": Recorder("a_slow")}})
                   for r in recorders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT * 2)
    ids = [d.id for r in recorders for d in r.sent]
    assert len(ids) == len(set(ids)) == 60
    assert all(r.sent for r in recorders), "both drains took part"


def test_newer_change_supersedes_a_pending_one(setup: tuple[Store, Config, Path]) -> None:
    store, config, warehouse = setup
    _run(store, config)  # u000 enters: true pending
    set_users(warehouse, [(u[0], None, None, None, None, 1.0 if u[0] == "u000" else 50.0)
                          for u in USERS])
    _run(store, config)  # u000 leaves before the true went out
    fast = Recorder("b_fast")
    _drain(store, config, clients={"a_slow": Recorder("a_slow"), "b_fast": fast})
    sent = [(d.user_id, d.value) for d in fast.sent if d.user_id == "u000"]
    assert sent == [("u000", "false")]
    assert _statuses(store, "b_fast")["u000"] == ["superseded", "sent"]


def test_transient_failures_wait_for_next_attempt_at(setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    _run(store, config)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    flaky = Recorder("b_fast", answer=lambda d: Outcome(d.id, ok=False, error="HTTP 503",
                                                        retry_after=120.0, attempts=3))
    report = _drain(store, config, keys=["members"], clock=lambda: now,
                   clients={"a_slow": Recorder("a_slow"), "b_fast": flaky})
    b_fast = report.destinations["b_fast"]
    # Deliveries it tried are still waiting: not ok (the CLI exits 1), and it says why.
    assert (b_fast.deferred, b_fast.waiting, b_fast.reason) == (60, 60, "HTTP 503")
    assert not report.ok and report.waiting_lines() == [
        "b_fast: 60 deliveries still waiting (HTTP 503)"]
    assert len(flaky.batches) == 1  # nothing got through: the destination is left alone
    with store.read() as conn:
        row = conn.execute(select(t.deliveries).where(
            t.deliveries.c.destination == "b_fast").limit(1)).one()
    assert (row.status, row.attempts, row.last_error) == ("pending", 3, "HTTP 503")
    assert row.next_attempt_at == now + timedelta(seconds=120)

    ok = Recorder("b_fast")
    _drain(store, config, clock=lambda: now + timedelta(seconds=60),
          clients={"a_slow": Recorder("a_slow"), "b_fast": ok})
    assert ok.sent == []  # not due yet
    _drain(store, config, clock=lambda: now + timedelta(seconds=121),
          clients={"a_slow": Recorder("a_slow"), "b_fast": ok})
    assert len(ok.sent) == 60


def test_halt_keeps_deliveries_pending_and_reports(setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    _run(store, config)
    refused = Recorder("b_fast", max_batch=10, answer=lambda d: Outcome(
        d.id, ok=False, halt=True, error="destination 'b_fast' refused the credentials"))
    report = _drain(store, config, clients={"a_slow": Recorder("a_slow"), "b_fast": refused})
    assert not report.ok and len(refused.batches) == 1
    assert report.destinations["b_fast"].error == (
        "destination 'b_fast' refused the credentials; 60 deliveries kept pending")
    assert set(s for v in _statuses(store, "b_fast").values() for s in v) == {"pending"}


def test_retry_requeues_failed_unless_a_newer_change_exists(
        setup: tuple[Store, Config, Path]) -> None:
    store, config, warehouse = setup
    _run(store, config)
    reject = Recorder("b_fast", answer=lambda d: Outcome(d.id, ok=False, permanent=True,
                                                         error="HTTP 400: bad"))
    report = _drain(store, config, clients={"a_slow": Recorder("a_slow"), "b_fast": reject})
    assert report.destinations["b_fast"].failed == 60 and not report.ok
    set_users(warehouse, [(u[0], None, None, None, None, 1.0 if u[0] == "u000" else 50.0)
                          for u in USERS])
    _run(store, config)  # u000 leaves: a newer (false) delivery is queued
    assert requeue_failed(store, None, "b_fast") == (59, 1)
    ok = Recorder("b_fast")
    _drain(store, config, clients={"a_slow": Recorder("a_slow"), "b_fast": ok})
    assert sorted(d.user_id for d in ok.sent) == sorted(u[0] for u in USERS)
    assert [d.value for d in ok.sent if d.user_id == "u000"] == ["false"]
    assert _statuses(store, "b_fast")["u000"] == ["superseded", "sent"]


def test_a_drain_sends_only_the_audiences_whose_leases_it_holds(
        setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    _run(store, config)
    fast = Recorder("b_fast")
    report = drain(store, config, [], clients={"a_slow": Recorder("a_slow"), "b_fast": fast})
    assert report.destinations == {} and fast.sent == []


def test_a_drain_stops_at_its_next_claim_once_its_lease_is_taken_over(
        setup: tuple[Store, Config, Path]) -> None:
    store, config, _ = setup
    _run(store, config)

    def take_over() -> None:  # another process, once this lease expired unnoticed
        if try_acquire(store, "members", "intruder", ttl=timedelta(seconds=60),
                       at=datetime.now(UTC) + timedelta(hours=1)) is None:
            raise AssertionError("the intruder could not take the lease")

    fast = Recorder("b_fast", max_batch=10, before=take_over)
    report = _drain(store, config, clients={"a_slow": Recorder("a_slow"), "b_fast": fast})
    # The batch on the wire when it happened is recorded; no other batch is claimed.
    assert len(fast.sent) == 10
    assert "members: the lease was taken over" in (report.destinations["b_fast"].error or "")
    assert not report.ok


def test_a_drain_stops_before_its_next_claim_when_its_control_says_so(
        setup: tuple[Store, Config, Path]) -> None:
    """The daemon's stop signal is checked between claims: the claim on the wire finishes and
    is recorded, nothing more is claimed, the rest stays pending."""
    store, config, _ = setup
    _run(store, config)
    sends: list[int] = []
    control = DrainControl(reason=lambda: "stopping" if sends else None,
                           on_sent=lambda: sends.append(1))
    clients: dict[str, Destination] = {"a_slow": Recorder("a_slow", max_batch=10),
                                       "b_fast": Recorder("b_fast", max_batch=10)}
    with ExitStack() as stack:
        leases = hold_all(stack, store, [c.key for c in config.computations], "test")
        report = drain(store, config, leases, clients=clients, control=control)
    sent = sum(r.sent for r in report.destinations.values())
    assert 10 <= sent <= 20  # each destination's claim in flight when the signal came, at most
    assert all("drain paused (stopping)" in (r.error or "")
               for r in report.destinations.values() if r.sent < 60)
    assert sum(r.waiting for r in report.destinations.values()) == 120 - sent
    assert control.sending == 0


def test_a_state_database_error_in_a_claim_is_a_store_error(
        setup: tuple[Store, Config, Path]) -> None:
    """SQLAlchemy errors leave state/ as StoreError, also from a claim's open transaction
    (PostgreSQL): the report says what failed, not 'unexpected ProgrammingError'."""
    store, config, _ = setup
    _run(store, config)
    with store.write() as conn:
        conn.exec_driver_sql("ALTER TABLE deliveries RENAME COLUMN observed_at TO observed")
    report = _drain(store, config, clients={"a_slow": Recorder("a_slow"),
                                            "b_fast": Recorder("b_fast")})
    errors = [r.error or "" for r in report.destinations.values()]
    assert all(e.startswith("state database error: ") for e in errors), errors
