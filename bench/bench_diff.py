"""Benchmark: an incremental run of a large audience against the floor, per state database.

For each state database (SQLite, and PostgreSQL when a URL is given):
  1. build a source (SQLite) with N member ids, run the initial sync and deliver it to a
     jsonl file (timed, reported, not part of the ratio; on PostgreSQL, VACUUM ANALYZE the
     outbox afterwards, as autovacuum would in the hours before the next run);
  2. churn the source: 1% of the members leave, 1% new ones join;
  3. in a fresh process: time the floor (read the same ids from the source with the raw driver,
     load them with raw executemany on SQLite or COPY on PostgreSQL into a table keyed by
     user_id, then one anti-join each way against the stored members), then time our
     incremental run (snapshot, diff, history, outbox, run record: everything), and read the
     process's peak RSS;
  4. churn back by as many members and time `audience-sync sync` as a process (start-up, run
     and delivery to the jsonl file included) against the same floor.
Prints `ratio=<ours/floor>`, `peak_rss_mb=` and `process_ratio=<process/floor>` per database.

    python bench/bench_diff.py [--members 1000000] [--churn 0.01] [--pg-url URL] [--only sqlite]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from audience_sync.config import load_config
from audience_sync.drain import drain
from audience_sync.leases import hold_all
from audience_sync.process import tune_garbage_collector
from audience_sync.runner import run_computation
from audience_sync.state.store import Store

T0 = datetime(2026, 11, 1, tzinfo=UTC)
BATCH = 10_000


def ids(start: int, stop: int) -> Iterator[tuple[str]]:
    for i in range(start, stop):
        yield (f"user-{i:09d}",)


def build_source(path: Path, members: int, churn: float) -> None:
    """Two generations of the audience; the `audience` view points at the current one."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("CREATE TABLE gen_a (user_id TEXT)")
    db.execute("CREATE TABLE gen_b (user_id TEXT)")
    moved = int(members * churn)
    db.executemany("INSERT INTO gen_a VALUES (?)", ids(0, members))
    # 1% leave (the first ids) and 1% join (ids past the end).
    db.executemany("INSERT INTO gen_b VALUES (?)", ids(moved, members + moved))
    db.execute("CREATE VIEW audience AS SELECT user_id FROM gen_a")
    db.commit()
    db.close()


def point_view(path: Path, table: str) -> None:
    db = sqlite3.connect(path)
    db.execute("DROP VIEW audience")
    db.execute(f"CREATE VIEW audience AS SELECT user_id FROM {table}")
    db.commit()
    db.close()


def write_config(workdir: Path, state_url: str, source: Path) -> Path:
    doc = {
        "state_db": state_url,
        "sources": {"src": {"url": f"sqlite:///{source}"}},
        "destinations": {"file": {"type": "jsonl", "path": str(workdir / "out.jsonl")}},
        "schedule": {"max_removal_fraction": 0.5},
        "audiences": [{"name": "Big Audience", "source": "src", "destinations": ["file"],
                       "query": "SELECT user_id FROM audience"}],
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def floor(state_url: str, source: Path, computation_id: int) -> float:
    """Raw driver: read the ids, bulk-load them keyed by user_id, one anti-join each way."""
    started = time.perf_counter()
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    cursor = src.execute("SELECT user_id FROM audience")
    url = make_url(state_url)
    if url.get_backend_name() == "sqlite":
        db = sqlite3.connect(url.database or "", isolation_level=None)
        db.execute("CREATE TEMP TABLE floor_stage (user_id TEXT PRIMARY KEY)")
        db.execute("BEGIN")
        while rows := cursor.fetchmany(BATCH):
            db.executemany("INSERT INTO floor_stage VALUES (?)", rows)
        entered = db.execute(
            "SELECT count(*) FROM floor_stage f WHERE NOT EXISTS (SELECT 1 FROM members m "
            "WHERE m.computation_id = ? AND m.user_id = f.user_id)", (computation_id,)).fetchone()
        left = db.execute(
            "SELECT count(*) FROM members m WHERE m.computation_id = ? AND NOT EXISTS "
            "(SELECT 1 FROM floor_stage f WHERE f.user_id = m.user_id)",
            (computation_id,)).fetchone()
        db.execute("ROLLBACK")
        db.close()
    else:
        engine = create_engine(url)
        with engine.connect() as conn:
            raw: Any = conn.connection.driver_connection
            with raw.cursor() as cur:
                # The fastest plain COPY: an unindexed table, one text block per batch.
                cur.execute("CREATE TEMP TABLE floor_stage (user_id TEXT)")
                with cur.copy("COPY floor_stage (user_id) FROM STDIN") as copy:
                    while rows := cursor.fetchmany(BATCH):
                        copy.write("\n".join([row[0] for row in rows]) + "\n")
                cur.execute("ANALYZE floor_stage")
                cur.execute(
                    "SELECT count(*) FROM floor_stage f WHERE NOT EXISTS (SELECT 1 FROM members m"
                    " WHERE m.computation_id = %s AND m.user_id = f.user_id)", (computation_id,))
                entered = cur.fetchone()
                cur.execute(
                    "SELECT count(*) FROM members m WHERE m.computation_id = %s AND NOT EXISTS "
                    "(SELECT 1 FROM floor_stage f WHERE f.user_id = m.user_id)",
                    (computation_id,))
                left = cur.fetchone()
            conn.rollback()
        engine.dispose()
    src.close()
    elapsed = time.perf_counter() - started
    assert entered and left
    return elapsed


def measure(config_path: str, state_url: str, source: str, queue: Any) -> None:
    """Runs in a fresh process so peak RSS is this work's alone."""
    tune_garbage_collector()  # as the command line does at start
    config = load_config(config_path)
    store = Store(config.state_db)
    comp = config.computations[0]
    row = store.computation(comp.key)
    assert row is not None
    floor_before = floor(state_url, Path(source), row.id)
    started = time.perf_counter()
    result = run_computation(store, config, comp, clock=lambda: T0 + timedelta(hours=2))
    ours = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    floor_after = floor(state_url, Path(source), row.id)
    store.dispose()
    queue.put({"ours": ours, "floor": min(floor_before, floor_after), "peak_mb": peak_mb,
               "status": result.status, "entered": result.entered, "exited": result.exited,
               "members": result.members})


def bench(name: str, state_url: str, workdir: Path, members: int, churn: float,
          deliver: bool = True) -> None:
    source = workdir / "source.db"
    build_source(source, members, churn)
    config_path = write_config(workdir, state_url, source)
    config = load_config(config_path)
    store = Store(config.state_db)
    store.upgrade()
    store.register(config.computations, T0)
    started = time.perf_counter()
    initial = run_computation(store, config, config.computations[0], clock=lambda: T0)
    initial_s = time.perf_counter() - started
    assert initial.status == "succeeded", initial.error
    # Deliver the initial sync (to a file), as a real deployment would before the next run.
    started = time.perf_counter()
    if deliver:
        with ExitStack() as stack:
            leases = hold_all(stack, store, [c.key for c in config.computations], "bench")
            report = drain(store, config, leases)
        assert report.ok, report.as_dict()
    drain_s = time.perf_counter() - started
    if store.dialect == "postgresql":
        # Hours pass between two runs in production, and autovacuum cleans up after the drain
        # turned a million pending deliveries into sent ones; here no time passes, so do its job.
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE deliveries")
    store.dispose()
    point_view(source, "gen_b")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=measure, args=(str(config_path), state_url, str(source),
                                                    queue))
    child.start()
    figures = queue.get(timeout=3600)
    child.join()
    assert figures["status"] == "succeeded", figures
    moved = int(members * churn)
    assert (figures["entered"], figures["exited"]) == (moved, moved), figures
    process = f"process_s={process_sync(config_path, source):.2f}" if deliver else None
    print(f"{name}: members={members} churn={churn:.0%} initial_s={initial_s:.2f} "
          f"initial_drain_s={drain_s:.2f} "
          f"incremental_s={figures['ours']:.2f} floor_s={figures['floor']:.2f} "
          f"ratio={figures['ours'] / figures['floor']:.2f} "
          f"peak_rss_mb={figures['peak_mb']:.0f}", flush=True)
    if process is not None:
        process_s = float(process.split("=")[1])
        print(f"{name}: {process} (audience-sync sync: start-up, run and delivery to jsonl) "
              f"process_ratio={process_s / figures['floor']:.2f}", flush=True)


def process_sync(config_path: Path, source: Path) -> float:
    """The whole process: `audience-sync sync` of the audience after another churn of the same
    size (the view points back: those who left return, those who joined leave), timed from
    exec to exit: interpreter and imports, schema check, run, and delivery of its changes
    (and of the previous incremental run's, which the same users' newer values supersede)."""
    point_view(source, "gen_a")
    command = [str(Path(sys.executable).with_name("audience-sync")), "--config",
               str(config_path), "sync"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--pg-url", default=None,
                        help="PostgreSQL admin URL (default: $AUDIENCE_SYNC_TEST_PG_URL)")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument("--no-deliver", action="store_true",
                        help="skip delivering the initial sync (a quicker memory check)")
    args = parser.parse_args()
    tune_garbage_collector()  # as the command line does at start
    import os

    pg_url = args.pg_url or os.environ.get("AUDIENCE_SYNC_TEST_PG_URL")
    with tempfile.TemporaryDirectory(prefix="bench_diff_") as tmp:
        if args.only in (None, "sqlite"):
            workdir = Path(tmp) / "sqlite"
            workdir.mkdir()
            bench("sqlite", f"sqlite:///{workdir / 'state.db'}", workdir, args.members,
                  args.churn, not args.no_deliver)
        if args.only in (None, "postgresql"):
            if not pg_url:
                print("postgresql: skipped (no --pg-url or AUDIENCE_SYNC_TEST_PG_URL)")
                return
            workdir = Path(tmp) / "pg"
            workdir.mkdir()
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(pg_url)
            with admin.begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {schema}"))
            url = make_url(pg_url).update_query_dict({"options": f"-csearch_path={schema}"})
            try:
                bench("postgresql", url.render_as_string(hide_password=False), workdir,
                      args.members, args.churn, not args.no_deliver)
            finally:
                with admin.begin() as conn:
                    conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
                admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
