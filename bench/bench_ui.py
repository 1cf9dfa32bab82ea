"""Benchmark: render time of the dashboard's audience page for a large audience.

Builds the state cheaply, straight into the schema (no syncs): one audience with N members
(members and history rows, one sent delivery each from its initial run), R runs with 1% churn
each way, a few hundred failed and pending deliveries; then renders `/audiences/<key>`, `/`
and one user's page through the WSGI app (SQL, templates and charts: everything but the
socket), best of several, and prints `render_ms=` for the audience page.

    python bench/bench_ui.py [--members 1000000] [--runs 500] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text

from audience_sync.config import load_config
from audience_sync.state.store import Store
from audience_sync.ui.app import Dashboard

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BATCH = 50_000
KEY = "big_audience"


def chunks(rows: Iterable[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def load(store: Store, table: str, columns: tuple[str, ...],
         rows: Iterable[tuple[Any, ...]]) -> None:
    """Bulk rows in with the driver: COPY on PostgreSQL, executemany on SQLite."""
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if store.dialect == "postgresql":
            with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" for _ in columns)
            cursor.execute("BEGIN")  # the store's SQLite connections autocommit otherwise
            for batch in chunks(rows):
                cursor.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                                   f"VALUES ({marks})", batch)
        raw.commit()
    finally:
        raw.close()


def at(dialect: str, when: datetime) -> Any:
    # UTCDateTime stores naive UTC on SQLite (ISO text) and timestamptz on PostgreSQL.
    return when.replace(tzinfo=None).isoformat(sep=" ") if dialect == "sqlite" else when


def build(store: Store, members: int, runs: int) -> None:
    d = store.dialect
    churn = max(members // 100, 1)
    with store.write() as conn:
        cid = conn.execute(text(
            "INSERT INTO computations (key, name, kind, definition_hash, created_at, "
            "initial_state, member_count, next_due_at) VALUES (:k, 'Big audience', 'audience', "
            "'bench', :t, 'complete', :m, :t) RETURNING id"),
            {"k": KEY, "t": at(d, T0), "m": members}).scalar_one()
    run_rows = []
    for i in range(runs):
        clock = T0 + timedelta(hours=2 * i)
        first = i == 0
        run_rows.append((i + 1, cid, "initial" if first else "incremental", "succeeded",
                         at(d, clock), at(d, clock), at(d, clock + timedelta(seconds=40)),
                         members, members if first else churn, 0 if first else churn, 0,
                         members if first else 2 * churn))
    load(store, "runs", ("id", "computation_id", "kind", "status", "clock", "started_at",
                         "finished_at", "members", "entered", "exited", "changed", "queued"),
         run_rows)
    ids = (f"user-{i:09d}" for i in range(members))
    load(store, "members", ("computation_id", "user_id", "entered_run"),
         ((cid, uid, 1) for uid in ids))
    load(store, "membership_history", ("computation_id", "user_id", "entered_at",
                                       "entered_run"),
         ((cid, f"user-{i:09d}", at(d, T0), 1) for i in range(members)))
    sent_at = at(d, T0 + timedelta(minutes=30))
    load(store, "deliveries", ("computation_id", "run_id", "destination", "user_id", "value",
                               "observed_at", "status", "attempts", "sent_at"),
         ((cid, 1, "planhat", f"user-{i:09d}", "true", at(d, T0), "sent", 1, sent_at)
          for i in range(members)))
    last = T0 + timedelta(hours=2 * (runs - 1))
    load(store, "deliveries", ("computation_id", "run_id", "destination", "user_id", "value",
                               "observed_at", "status", "attempts", "last_error"),
         [(cid, runs, "planhat", f"user-{i:09d}", "false", at(d, last),
           "failed" if i % 2 else "pending", 1, "400: unknown user" if i % 2 else None)
          for i in range(400)])
    with store.write() as conn:
        conn.execute(text("UPDATE computations SET last_run_id = :r, last_run_at = :t, "
                          "last_success_at = :t WHERE id = :c"),
                     {"r": runs, "t": at(d, last), "c": cid})
        conn.execute(text("ANALYZE"))  # as autovacuum (or SQLite's optimize) would have


def render(app: Dashboard, path: str) -> tuple[float, int]:
    """Milliseconds to answer `path`, and the body size."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "",
               "wsgi.input": io.BytesIO()}
    status: list[str] = []
    started = time.perf_counter()
    body = b"".join(app(environ, lambda s, h, e=None: status.append(s)))  # type: ignore[misc]
    elapsed = (time.perf_counter() - started) * 1000
    assert status[0].startswith("200"), status
    return elapsed, len(body)


def bench(url: str, members: int, runs: int, repeat: int, workdir: Path) -> None:
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "state_db": url,
        "sources": {"w": {"url": f"sqlite:///{workdir / 'w.db'}"}},
        "destinations": {"planhat": {"type": "jsonl", "path": "o.jsonl"}},
        "audiences": [{"name": "Big audience", "key": KEY, "source": "w",
                       "destinations": ["planhat"], "query": "SELECT 1 AS user_id"}],
    }))
    config = load_config(config_path)
    store = Store(url)
    store.upgrade()
    started = time.perf_counter()
    build(store, members, runs)
    print(f"[{store.dialect}] built {members:,} members, {runs:,} runs in "
          f"{time.perf_counter() - started:.1f}s", flush=True)
    app = Dashboard(store, config, None, clock=lambda: T0 + timedelta(hours=2 * runs))
    for label, path in (("render_ms", f"/audiences/{KEY}"), ("index_ms", "/"),
                        ("user_ms", f"/audiences/{KEY}/users/user-000000007"),
                        ("api_ms", f"/api/audiences/{KEY}")):
        render(app, path)  # warm: templates compiled, pages cached
        times = [render(app, path) for _ in range(repeat)]
        best = min(t for t, _ in times)
        median = statistics.median(t for t, _ in times)
        print(f"[{store.dialect}] {label}={best:.1f} (median {median:.1f} ms, "
              f"{times[0][1]:,} bytes) {path}", flush=True)
    store.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pg-url", default=None, help="Also on this PostgreSQL database "
                        "(a schema of its own is created and dropped).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bench(f"sqlite:///{workdir / 'state.db'}", args.members, args.runs, args.repeat,
              workdir)
        if args.pg_url:
            schema = f"bench_ui_{uuid.uuid4().hex[:8]}"
            admin = create_engine(args.pg_url)
            with admin.begin() as conn:
                conn.execute(text(f"CREATE SCHEMA {schema}"))
            sep = "&" if "?" in args.pg_url else "?"
            try:
                bench(f"{args.pg_url}{sep}options=-csearch_path%3D{schema}", args.members,
                      args.runs, args.repeat, workdir)
            finally:
                with admin.begin() as conn:
                    conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
                admin.dispose()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
