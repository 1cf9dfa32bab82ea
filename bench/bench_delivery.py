"""Benchmark: delivery against the fake servers on loopback (DESIGN.md section 8).

(a) Planhat Segment mode, the fake enforcing the configured rate limit (token bucket, small
    burst): achieved rate / allowed rate over a full drain, and the number of 429s (must be 0).
(b) Segment `/v1/batch`: our drain's throughput (state store reads and writes included, the
    destination's default concurrency) / a bare httpx loop posting the same pre-built batches,
    one after the other, to the same kind of server. Each phase of each round gets a fresh
    server; rounds alternate which phase runs first; the median ratio of the rounds is printed.
Prints `ratio=` lines. The fake servers run in child processes (with Python's default garbage
collector settings), so their CPU is not the measured client's.

    python bench/bench_delivery.py [--rate 200] [--seconds 5] [--segment-messages 50000]
                                   [--rounds 3] [--send identify,track]

--send: the calls each destination is sent (`send:`); with both, every change is two
messages (an identify and a track), each its own request to Planhat.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from audience_sync.config import Config, load_config
from audience_sync.destinations.segment import BATCH_PATH, batch_body, encode, pack
from audience_sync.drain import DrainReport, drain
from audience_sync.leases import hold_all
from audience_sync.process import tune_garbage_collector
from audience_sync.runner import run_computation
from audience_sync.state import schema as t
from audience_sync.state.outbox import load_batch
from audience_sync.state.store import Store
from tests.fakes import FakePlanhat, FakeSegment, basic
from tests.helpers import make_warehouse

DEFAULT_GC_THRESHOLD = gc.get_threshold()
TENANT = "bench-tenant-token"
WRITE_KEY = "bench-write-key"


def _serve(kind: str, rate: float | None, burst: float, conn: Any) -> None:
    gc.set_threshold(*DEFAULT_GC_THRESHOLD)  # the fake is not tuned like our process
    fake = (FakePlanhat(TENANT, rate=rate, burst=burst) if kind == "planhat"
            else FakeSegment(WRITE_KEY))
    fake.start()
    conn.send(fake.url)
    conn.recv()  # until asked for the figures
    conn.send({"statuses": dict(fake.statuses), "acked": len(fake.acked),
               "duplicates": len(fake.duplicates()), "cpu": time.process_time()})
    fake.stop()


class Server:
    """A fake in a child process."""

    def __init__(self, kind: str, rate: float | None = None, burst: float = 1.0) -> None:
        self.conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=_serve, args=(kind, rate, burst, child),
                                               daemon=True)
        self.process.start()
        self.url: str = self.conn.recv()

    def finish(self) -> dict[str, Any]:
        self.conn.send("done")
        figures: dict[str, Any] = self.conn.recv()
        self.process.join(10)
        return figures


def _setup(tmp: Path, name: str, users: int, destination: dict[str, Any]) -> tuple[Store,
                                                                                    Config]:
    warehouse = tmp / f"{name}-warehouse.db"
    make_warehouse(warehouse, ((f"user-{i:07d}", f"user{i}@example.com", f"User {i}", "Engineer",
                                f"c{i % 100}", 50.0) for i in range(users)))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "state_db": f"sqlite:///{tmp / name}-state.db",
        "sources": {"warehouse": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {name: destination},
        "audiences": [{"name": "Bench Audience", "source": "warehouse",
                       "query": "SELECT id AS user_id, email, name, title, company_id "
                                "FROM users", "destinations": [name]}],
    }))
    config = load_config(path)
    store = Store(config.state_db)
    store.upgrade()
    store.register(config.computations, datetime.now(UTC))
    assert run_computation(store, config, config.computations[0]).ok
    return store, config


def bench_planhat(tmp: Path, rate: float, seconds: float, send: list[str]) -> None:
    messages = int(rate * seconds)
    burst = max(2.0, rate / 20)  # Planhat tolerates short bursts; we never rely on them
    server = Server("planhat", rate=rate, burst=burst)
    store, config = _setup(tmp, "planhat", messages // len(send), {
        "type": "planhat", "tenant_token": TENANT, "base_url": server.url,
        "rate_limit": f"{rate:g}/s", "concurrency": 4, "send": send})
    started = time.perf_counter()
    with ExitStack() as stack:
        leases = hold_all(stack, store, [c.key for c in config.computations], "bench")
        report = drain(store, config, leases)
    elapsed = time.perf_counter() - started
    figures = server.finish()
    achieved = report.destinations["planhat"].sent / elapsed
    throttled = figures["statuses"].get(429, 0)
    print(f"planhat segment mode, send {'+'.join(send)}: allowed {rate:g}/s "
          f"(fake burst {burst:g}), achieved "
          f"{achieved:.1f}/s, {report.destinations['planhat'].sent} sent in {elapsed:.2f}s, "
          f"429s: {throttled}")
    print(f"ratio={achieved / rate:.3f} planhat_rate_achieved_over_allowed "
          f"(target >= 0.9; 429s={throttled}, must be 0)")


def bench_segment(tmp: Path, messages: int, rounds: int, send: list[str]) -> None:
    ratios = []
    store, config = None, None
    for round_ in range(1, rounds + 1):
        # Each phase of each round gets a server of its own, fresh: a server already holding
        # the other phase's 50,000 messages answers more slowly (its garbage collector has
        # more to walk), which is not ours or the bare loop's doing.
        bare_server, our_server = Server("segment"), Server("segment")
        # The destination's defaults, but for a rate limit out of the way.
        destination = {"type": "segment", "write_key": WRITE_KEY, "base_url": our_server.url,
                       "rate_limit": "100000/s", "send": send}
        if store is None:
            messages -= messages % len(send)  # every change is len(send) messages
            store, config = _setup(tmp, "segment", messages // len(send), destination)
        else:
            config = _point(tmp, "segment", our_server.url)
            with store.write() as conn:  # the same changes, pending again
                conn.execute(update(t.deliveries).values(
                    status="pending", sent_at=None, attempts=0))
        assert config is not None
        bodies = _bare_bodies(store, messages)

        # Alternate which phase goes first, so neither always finds the machine warmer.
        if round_ % 2:
            bare = _bare_loop(bare_server.url, bodies)
            ours, report = _our_drain(store, config)
        else:
            ours, report = _our_drain(store, config)
            bare = _bare_loop(bare_server.url, bodies)
        bare_figures, figures = bare_server.finish(), our_server.finish()
        sent = report.destinations["segment"].sent
        assert sent == messages == figures["acked"], (report.as_dict(), figures)
        ratios.append(bare / ours)
        print(f"segment batch, round {round_} ({'bare loop' if round_ % 2 else 'ours'} first): "
              f"{len(bodies)} batches of ~{messages // len(bodies)} messages; bare loop "
              f"{messages / bare:,.0f} msg/s, ours {sent / ours:,.0f} msg/s "
              f"({report.destinations['segment'].requests} requests; acknowledged by the "
              f"server: {figures['acked']:,}; server CPU {bare_figures['cpu']:.2f}s for the "
              f"bare loop, {figures['cpu']:.2f}s for ours; ratio {bare / ours:.3f})")
    print(f"ratio={statistics.median(ratios):.3f} segment_throughput_ours_over_bare_loop "
          f"(median of {rounds} rounds; target >= 0.8)")


def _bare_loop(url: str, bodies: list[bytes]) -> float:
    """Seconds to post the batches one after the other on one warm connection."""
    with httpx.Client(base_url=url, headers={"Authorization": basic(WRITE_KEY),
                                             "Content-Type": "application/json"}) as client:
        client.post(BATCH_PATH, content=bodies[0]).raise_for_status()  # warm the connection
        started = time.perf_counter()
        for body in bodies:
            client.post(BATCH_PATH, content=body).raise_for_status()
        return time.perf_counter() - started


def _our_drain(store: Store, config: Config) -> tuple[float, DrainReport]:
    started = time.perf_counter()
    with ExitStack() as stack:
        leases = hold_all(stack, store, [c.key for c in config.computations], "bench")
        report = drain(store, config, leases)
    return time.perf_counter() - started, report


def _bare_bodies(store: Store, messages: int) -> list[bytes]:
    """The bare loop's batches: the very messages our drain will send, packed the same way.
    (Only the bytes stay alive: neither phase carries the other's objects.)"""
    with store.read() as conn:
        deliveries = load_batch(conn, "segment", messages, datetime.now(UTC))
    return [batch_body([m for _, m in batch], datetime.now(UTC))
            for batch in pack([(d.id, encode(d)) for d in deliveries])]


def _point(tmp: Path, name: str, url: str) -> Config:
    """The config written by _setup, with the destination at another server."""
    path = tmp / f"{name}.yaml"
    document = yaml.safe_load(path.read_text())
    document["destinations"][name]["base_url"] = url
    path.write_text(yaml.safe_dump(document))
    return load_config(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="Planhat requests/s allowed")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the Planhat run")
    parser.add_argument("--segment-messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the Segment bench")
    parser.add_argument("--send", default="identify",
                        help="the calls sent, comma-separated: identify, track or both")
    args = parser.parse_args()
    send = [call.strip() for call in args.send.split(",") if call.strip()]
    tune_garbage_collector()  # as the command line does at start
    with tempfile.TemporaryDirectory() as tmp:
        bench_planhat(Path(tmp), args.rate, args.seconds, send)
        bench_segment(Path(tmp), args.segment_messages, args.rounds, send)


if __name__ == "__main__":
    main()
