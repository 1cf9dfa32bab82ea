"""Create the demo warehouse (Segment's warehouse schema) if it is missing.

Deterministic: the same seed gives the same users and events; event times are laid out over
the 90 days before the day the file is made, so the demo's "last 30 days" audiences are never
empty. Each event with properties also has a table of its own, as Segment writes them:
`order_completed` (total, currency), `product_viewed` (category, price) and `plan_changed`
(plan); users carry a `plan` trait. Each user belongs to one account (`users.company_id`), and
the `accounts` table holds the 400 accounts (id `c0001`..`c0400`, name, plan, employees,
created_at) for account audiences. SQLite by default; a path ending in `.duckdb` writes the same
rows as DuckDB (needs the `duckdb` package: `pip install '.[duckdb]'`), with native `TIMESTAMP`
columns.

    python demo/make_warehouse.py [PATH] [--force]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

USERS = 5_000
EVENTS = 100_000
DAYS = 90
SEED = 20261128
EVENT_MIX = [("Page Viewed", 60), ("Product Viewed", 25), ("Order Completed", 10),
             ("Signed Up", 5)]
FIRST = ["Ann", "Ben", "Chloé", "Dev", "Eva", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
LAST = ["Berg", "Costa", "Dahl", "Eze", "Faye", "Grün", "Hale", "Ito", "Jain", "Kerr", "Lund"]
TITLES = ["CTO", "Data Engineer", "Head of Growth", "Analyst", "VP Sales", "Founder", None]
PLANS = ["free", "free", "pro", "premium"]
CATEGORIES = ["books", "games", "garden", "music", "toys"]
CURRENCIES = ["usd", "eur", "gbp"]
PLAN_CHANGES = 3_000
# Accounts: the ids users are given (`c0001`..`c0400`), each name one of 20 x 20 word pairs.
ACCOUNTS = 400
ACCOUNT_WORDS = (["Acme", "Birch", "Cobalt", "Delta", "Ember", "Fjord", "Granite", "Harbor",
                  "Iris", "Juniper", "Kestrel", "Lumen", "Maple", "Nimbus", "Orbit", "Pine",
                  "Quartz", "Rowan", "Summit", "Tidal"],
                 ["Analytics", "Bakery", "Cloud", "Dynamics", "Energy", "Foods", "Games",
                  "Health", "Insurance", "Labs", "Logistics", "Media", "Networks", "Outdoor",
                  "Partners", "Robotics", "Software", "Studios", "Travel", "Works"])
ACCOUNT_PLANS = ["starter", "starter", "growth", "enterprise"]
# Event -> (its table, its property columns with their SQL types).
EVENT_TABLES = {
    "Order Completed": ("order_completed", (("total", "REAL"), ("currency", "TEXT"))),
    "Product Viewed": ("product_viewed", (("category", "TEXT"), ("price", "REAL"))),
    "Plan Changed": ("plan_changed", (("plan", "TEXT"),)),
}


Row = tuple[object, ...]


def generate(now: datetime) -> tuple[list[Row], list[Row]]:
    """The demo's users and events (user_id, event, ISO-8601 UTC timestamp, then the event's
    properties), oldest first."""
    rng = random.Random(SEED)
    users = []
    for i in range(1, USERS + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        users.append((f"u{i:05d}", f"{first.lower()}.{last.lower()}{i}@example.com",
                      f"{first} {last}", rng.choice(TITLES), f"c{rng.randint(1, 400):04d}",
                      round(rng.lognormvariate(5.5, 1.2), 2),
                      (now - timedelta(days=rng.randint(90, 900))).strftime("%Y-%m-%dT%H:%M:%SZ")))
    # Properties from a generator of their own: the users and events above stay as they were.
    extra = random.Random(SEED + 1)
    users = [(*u, extra.choice(PLANS)) for u in users]
    names = [name for name, _ in EVENT_MIX]
    weights = [w for _, w in EVENT_MIX]
    # A few heavy users, a long tail, and a third of users with no recent events at all.
    active = [u[0] for u in users[: USERS * 2 // 3]]
    events = []
    for _ in range(EVENTS):
        user = active[min(int(rng.paretovariate(1.2)) - 1, len(active) - 1)] \
            if rng.random() < 0.3 else rng.choice(active)
        at = now - timedelta(seconds=rng.randint(0, DAYS * 86400))
        events.append((user, rng.choices(names, weights)[0], at.strftime("%Y-%m-%dT%H:%M:%SZ")))
    for _ in range(PLAN_CHANGES):
        at = now - timedelta(seconds=extra.randint(0, DAYS * 86400))
        events.append((extra.choice(active), "Plan Changed", at.strftime("%Y-%m-%dT%H:%M:%SZ")))
    events = [(*e, *_properties(extra, str(e[1]))) for e in events]
    events.sort(key=lambda e: str(e[2]))
    return users, events


def generate_accounts(now: datetime) -> list[Row]:
    """The demo's accounts (id, name, plan, employees, ISO-8601 UTC created_at), by id. From a
    generator of their own, so the users and events of `generate` stay as they were."""
    rng = random.Random(SEED + 2)
    names = [f"{first} {second}" for first in ACCOUNT_WORDS[0] for second in ACCOUNT_WORDS[1]]
    rng.shuffle(names)
    return [(f"c{i:04d}", names[i - 1], rng.choice(ACCOUNT_PLANS),
             max(1, round(rng.lognormvariate(3.5, 1.3))),
             (now - timedelta(days=rng.randint(900, 3000))).strftime("%Y-%m-%dT%H:%M:%SZ"))
            for i in range(1, ACCOUNTS + 1)]


def _properties(rng: random.Random, event: str) -> Row:
    if event == "Order Completed":
        return (round(rng.lognormvariate(4, 0.8), 2), rng.choice(CURRENCIES))
    if event == "Product Viewed":
        return (rng.choice(CATEGORIES), round(rng.uniform(2, 200), 2))
    if event == "Plan Changed":
        return (rng.choice(PLANS),)
    return ()


def _event_rows(events: list[Row]) -> dict[str, list[Row]]:
    """Each event table's rows: user_id, timestamp, then its properties."""
    rows: dict[str, list[Row]] = {table: [] for table, _ in EVENT_TABLES.values()}
    for e in events:
        if e[1] in EVENT_TABLES:
            rows[EVENT_TABLES[str(e[1])][0]].append((e[0], e[2], *e[3:]))
    return rows


def _event_tables_sql(timestamp: str, real: str) -> str:
    return "".join(
        f"CREATE TABLE {table} (user_id TEXT, timestamp {timestamp}, "
        + ", ".join(f"{name} {real if kind == 'REAL' else kind}" for name, kind in columns)
        + ");\n" for table, columns in EVENT_TABLES.values())


def build(path: Path, now: datetime) -> None:
    users, events = generate(now)
    accounts = generate_accounts(now)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    if path.suffix == ".duckdb":
        _write_duckdb(tmp, users, events, accounts)
    else:
        _write_sqlite(tmp, users, events, accounts)
    tmp.replace(path)


def _write_sqlite(path: Path, users: list[Row], events: list[Row], accounts: list[Row]) -> None:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, title TEXT,
                            company_id TEXT, lifetime_value REAL, created_at TEXT, plan TEXT);
        CREATE TABLE tracks (id INTEGER PRIMARY KEY, user_id TEXT, event TEXT, timestamp TEXT);
        CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT, plan TEXT, employees INTEGER,
                               created_at TEXT);
    """ + _event_tables_sql("TEXT", "REAL"))
    db.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?)", users)
    db.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?, ?)", accounts)
    db.executemany("INSERT INTO tracks (user_id, event, timestamp) VALUES (?, ?, ?)",
                   [e[:3] for e in events])
    for table, rows in _event_rows(events).items():
        marks = ", ".join("?" * len(rows[0]))
        db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    db.execute("CREATE INDEX ix_tracks_event_timestamp ON tracks (event, timestamp)")
    db.commit()
    db.close()


def _write_duckdb(path: Path, users: list[Row], events: list[Row], accounts: list[Row]) -> None:
    import csv
    import tempfile

    import duckdb  # an optional dependency: only this format needs it

    # Row-by-row inserts into DuckDB take minutes for 100,000 rows; its CSV reader takes
    # well under a second.
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        tables = {"users": users, "tracks": [e[:3] for e in events], "accounts": accounts,
                  **_event_rows(events)}
        for name, rows in tables.items():
            files[name] = str(Path(tmp) / f"{name}.csv")
            with open(files[name], "w", newline="", encoding="utf-8") as out:
                csv.writer(out).writerows(rows)
        db = duckdb.connect(str(path))
        db.execute("""
            CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT, name TEXT, title TEXT,
                                company_id TEXT, lifetime_value DOUBLE, created_at TIMESTAMP,
                                plan TEXT);
            CREATE TABLE tracks (user_id TEXT, event TEXT, timestamp TIMESTAMP);
            CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT, plan TEXT, employees INTEGER,
                                   created_at TIMESTAMP);
        """ + _event_tables_sql("TIMESTAMP", "DOUBLE"))
        for name in tables:
            db.execute(f"INSERT INTO {name} SELECT * FROM read_csv(?, header = false, "
                       "all_varchar = true)", [files[name]])
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=Path(__file__).parent / "warehouse.db",
                        type=Path)
    parser.add_argument("--force", action="store_true", help="rebuild even if it exists")
    args = parser.parse_args()
    if args.path.exists() and not args.force:
        print(f"demo warehouse {args.path} exists")
        return
    args.path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    build(args.path, now)
    print(f"demo warehouse {args.path}: {USERS} users in {ACCOUNTS} accounts, "
          f"{EVENTS + PLAN_CHANGES} events over {DAYS} days")


if __name__ == "__main__":
    main()
