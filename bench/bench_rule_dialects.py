"""Benchmark: one `rule:` audience over the same events on a SQLite and on a DuckDB source.

Writes N events (default 1,000,000) for U users (default 100,000, with their emails) into
Segment's warehouse schema twice: as SQLite (ISO-8601 text timestamps, indexed by event and
time, as the demo) and as DuckDB (native TIMESTAMP). Then times the rule's compiled SELECT,
read to the end through the source engine audience-sync uses (read-only), best of three.
Prints `sqlite_s=`, `duckdb_s=`, `members=` (equal on both, or the benchmark fails) and
`duckdb_over_sqlite=`.

    python bench/bench_rule_dialects.py [--events 1000000] [--users 100000]
"""

from __future__ import annotations

import argparse
import csv
import random
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from audience_sync.config import Rule, Source
from audience_sync.sources import compile_rule, create_source_engine

NOW = datetime(2026, 11, 30, tzinfo=UTC)
EVENTS = ["Page Viewed", "Product Viewed", "Order Completed", "Signed Up"]
RULE = Rule(event="Order Completed", within=timedelta(days=30), at_least=2)


def write(folder: Path, events: int, users: int) -> tuple[str, str]:
    rng = random.Random(7)
    rows = [(f"u{rng.randrange(users):07d}", rng.choice(EVENTS),
             (NOW - timedelta(seconds=rng.randrange(90 * 86400))).strftime("%Y-%m-%dT%H:%M:%SZ"))
            for _ in range(events)]
    people = [(f"u{i:07d}", f"u{i}@example.com") for i in range(users)]
    lite = folder / "w.db"
    db = sqlite3.connect(lite)
    db.execute("CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT)")
    db.executemany("INSERT INTO users VALUES (?, ?)", people)
    db.execute("CREATE TABLE tracks (user_id TEXT, event TEXT, timestamp TEXT)")
    db.executemany("INSERT INTO tracks VALUES (?, ?, ?)", rows)
    db.execute("CREATE INDEX ix_tracks_event_timestamp ON tracks (event, timestamp)")
    db.commit()
    db.close()
    import duckdb

    flat, flat_users = folder / "tracks.csv", folder / "users.csv"
    with open(flat, "w", newline="") as out:
        csv.writer(out).writerows(rows)
    with open(flat_users, "w", newline="") as out:
        csv.writer(out).writerows(people)
    duck = folder / "w.duckdb"
    ddb = duckdb.connect(str(duck))
    ddb.execute("CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT)")
    ddb.execute("INSERT INTO users SELECT * FROM read_csv(?, header = false, "
                "all_varchar = true)", [str(flat_users)])
    ddb.execute("CREATE TABLE tracks (user_id TEXT, event TEXT, timestamp TIMESTAMP)")
    ddb.execute("INSERT INTO tracks SELECT * FROM read_csv(?, header = false, "
                "all_varchar = true)", [str(flat)])
    ddb.close()
    return f"sqlite:///{lite}", f"duckdb:///{duck}"


def time_rule(url: str) -> tuple[float, int]:
    best, members = float("inf"), -1
    for _ in range(3):
        engine = create_source_engine(url)
        started = time.perf_counter()
        statement = compile_rule(RULE, Source(url=url), engine, NOW)
        with engine.connect() as conn:
            members = len(conn.execute(statement).fetchall())
        best = min(best, time.perf_counter() - started)
        engine.dispose()
    return best, members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lite, duck = write(Path(tmp), args.events, args.users)
        lite_s, lite_n = time_rule(lite)
        duck_s, duck_n = time_rule(duck)
    if lite_n != duck_n:
        raise SystemExit(f"members differ: sqlite {lite_n}, duckdb {duck_n}")
    print(f"events={args.events} users={args.users} members={lite_n}")
    print(f"sqlite_s={lite_s:.3f} duckdb_s={duck_s:.3f} duckdb_over_sqlite={duck_s / lite_s:.2f}")


if __name__ == "__main__":
    main()
