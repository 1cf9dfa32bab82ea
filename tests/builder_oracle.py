"""An independent evaluator of builder definitions, and the random rows and definitions it
is compared on.

The evaluator is plain Python over the generated rows, written from the issue's semantics
(issue 13), not from the compiler: windows are (now - start, now - end]; a null satisfies
only not_exists; the universe is users' ids with every non-null tracks user_id; a funnel
step comes strictly after the previous one, within its `within` of it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

NOW = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
DURATIONS = {"1d": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30),
             "2h": timedelta(hours=2)}
BETWEENS = [("30d", "7d"), ("7d", "1d"), ("30d", "1d")]
# Event -> its properties and their values (None: a null in the row).
PROPERTIES: dict[str, dict[str, list[Any]]] = {
    "Order Completed": {"total": [None, 5.0, 10.5, 50.0, 100.0, 100.25, 250.0],
                        "currency": [None, "usd", "eur", "gbp", "usdc"]},
    "Product Viewed": {"category": [None, "books", "games", "garden", "music", "50%_off"],
                       "price": [None, 1.5, 10.0, 20.0, 99.75]},
    "Plan Changed": {"plan": [None, "free", "pro", "premium", "promo"]},
}
TABLES = {"Order Completed": "order_completed", "Product Viewed": "product_viewed",
          "Plan Changed": "plan_changed"}
EVENTS = [*PROPERTIES, "Signed Up"]  # Signed Up lives in tracks only
TRAITS: dict[str, list[Any]] = {
    "plan": [None, "free", "pro", "premium", "promo"],
    "country": [None, "de", "dk", "fr", "us"],
    "score": [None, 0.0, 1.5, 10.0, 42.0, 100.0],
}
USERS_COLUMNS = ("id", "email", "name", "title", *TRAITS)


@dataclass(frozen=True)
class Event:
    user_id: str | None
    event: str
    at: datetime
    props: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class Data:
    users: list[dict[str, Any]]
    events: list[Event]

    @property
    def rows(self) -> int:
        in_tables = sum(1 for e in self.events if e.event in TABLES)
        return len(self.users) + len(self.events) + in_tables


def generate(seed: int = 13, users: int = 60) -> Data:
    rng = random.Random(seed)
    people = []
    for i in range(users):
        row: dict[str, Any] = {"id": f"u{i:03d}", "email": rng.choice([None, f"u{i}@x.io"]),
                               "name": f"User {i}", "title": rng.choice([None, "CTO"])}
        for name, values in TRAITS.items():
            row[name] = rng.choice(values)
        people.append(row)
    ids = [p["id"] for p in people] + [f"t{i:02d}" for i in range(10)]  # t..: tracks only
    # Times at the windows' edges (exactly, and a millisecond or second either side), some in
    # the future, and a spread over 40 days.
    edges = [timedelta(0), *DURATIONS.values()]
    nudges = [timedelta(0), timedelta(milliseconds=1), -timedelta(milliseconds=1),
              timedelta(seconds=1), -timedelta(seconds=1)]
    events: list[Event] = []

    def add(user: str | None, name: str, at: datetime) -> None:
        props = {p: rng.choice(v) for p, v in PROPERTIES.get(name, {}).items()}
        events.append(Event(user, name, at, props))

    for _ in range(1200):
        if rng.random() < 0.35:
            at = NOW - rng.choice(edges) + rng.choice(nudges)
        else:
            at = NOW - timedelta(milliseconds=rng.randrange(-2 * 86_400_000, 40 * 86_400_000))
        user = None if rng.random() < 0.02 else rng.choice(ids)
        add(user, rng.choice(EVENTS), at)
    # Funnel edges: a next step exactly `within` after the previous one, a little either side,
    # and at the very same instant.
    for _ in range(150):
        user = rng.choice(ids)
        first, second = rng.sample(EVENTS, 2)
        at = NOW - timedelta(days=rng.choice([1, 3, 8, 20]))
        add(user, first, at)
        gap = rng.choice([*DURATIONS.values(), timedelta(0)]) + rng.choice(nudges)
        add(user, second, at + gap)
    return Data(people, events)


# -- the evaluator --------------------------------------------------------------------------------

def _window(raw: dict[str, Any]) -> tuple[datetime | None, datetime]:
    if "within" in raw:
        return NOW - DURATIONS[raw["within"]], NOW
    if "between" in raw:
        return NOW - DURATIONS[raw["between"][0]], NOW - DURATIONS[raw["between"][1]]
    return None, NOW


def _in_window(at: datetime, window: tuple[datetime | None, datetime]) -> bool:
    start, end = window
    return start is None or start < at <= end


def holds(value: Any, f: dict[str, Any]) -> bool:
    op, wanted = f["op"], f.get("value")
    if op == "not_exists":
        return value is None
    if value is None:
        return False
    if op == "exists":
        return True
    if op == "in":
        return value in wanted
    if op == "not_in":
        return value not in wanted
    if op == "contains":
        return wanted in value
    if op == "starts_with":
        return bool(value.startswith(wanted))
    return bool({"=": value == wanted, "!=": value != wanted, ">": value > wanted,
                 ">=": value >= wanted, "<": value < wanted, "<=": value <= wanted}[op])


class Oracle:
    def __init__(self, data: Data, audiences: dict[str, list[Any]] | None = None) -> None:
        self.data = data
        self.audiences = audiences or {}
        self.traits = {u["id"]: u for u in data.users}
        self.universe = {u["id"] for u in data.users} | \
            {e.user_id for e in data.events if e.user_id is not None}

    def rows(self, event: str, window: tuple[datetime | None, datetime],
             filters: list[dict[str, Any]]) -> list[Event]:
        return [e for e in self.data.events
                if e.event == event and e.user_id is not None and _in_window(e.at, window)
                and all(holds(e.props.get(f["property"]), f) for f in filters)]

    def members(self, where: list[Any]) -> set[str]:
        return self.condition({"all": where})

    def condition(self, raw: dict[str, Any]) -> set[str]:
        if "all" in raw:
            result = set(self.universe)
            for c in raw["all"]:
                result &= self.condition(c)
            return result
        if "any" in raw:
            return set().union(*(self.condition(c) for c in raw["any"]))
        if "none" in raw:
            return self.universe - set().union(*(self.condition(c) for c in raw["none"]))
        if "audience" in raw:
            return self.members(self.audiences[raw["audience"]])
        if "trait" in raw:
            f = raw["trait"]
            return {u for u in self.universe
                    if holds(self.traits.get(u, {}).get(f["name"]), f)}
        if "funnel" in raw:
            return self.funnel(raw["funnel"])
        counts = Counter(e.user_id for e in self.rows(raw["event"], _window(raw),
                                                        raw.get("where", [])))
        (kind, n), = raw.get("count", {"at_least": 1}).items()
        test = {"at_least": lambda c: c >= n, "at_most": lambda c: c <= n,
                "exactly": lambda c: c == n}[kind]
        return {u for u in self.universe if test(counts.get(u, 0))}

    def funnel(self, steps: list[dict[str, Any]]) -> set[str]:
        first = steps[0]
        window = (NOW - DURATIONS[first["within"]], NOW) if "within" in first else (None, NOW)
        reached = {(e.user_id, e.at) for e in self.rows(first["event"], window,
                                                          first.get("where", []))}
        for step in steps[1:]:
            within = DURATIONS[step["within"]] if "within" in step else None
            candidates = self.rows(step["event"], (None, NOW), step.get("where", []))
            reached = {(e.user_id, e.at) for e in candidates
                       if any(u == e.user_id and t < e.at and (within is None
                                                               or e.at - t <= within)
                              for u, t in reached)}
        return {u for u, _ in reached if u is not None}

    def trait(self, raw: dict[str, Any]) -> dict[str, Any]:
        kind = next(k for k in raw if k not in ("within", "between", "where"))
        if kind == "count":
            rows = self.rows(raw[kind], _window(raw), raw.get("where", []))
            return dict(Counter(e.user_id for e in rows))
        prop = raw[kind]["property"]
        rows = [e for e in self.rows(raw[kind]["event"], _window(raw), raw.get("where", []))
                if e.props.get(prop) is not None]
        values: dict[str, list[tuple[datetime, Any]]] = {}
        for e in rows:
            assert e.user_id is not None
            values.setdefault(e.user_id, []).append((e.at, e.props[prop]))
        out: dict[str, Any] = {}
        for user, seen in values.items():
            plain = [v for _, v in seen]
            if kind == "sum":
                out[user] = sum(plain)
            elif kind == "avg":
                out[user] = sum(plain) / len(plain)
            elif kind in ("min", "max"):
                out[user] = min(plain) if kind == "min" else max(plain)
            elif kind == "unique_count":
                out[user] = len(set(plain))
            elif kind == "unique_list":
                out[user] = sorted(set(plain))
            elif kind == "most_frequent":
                counted = Counter(plain)
                best = sorted((-n, v) for v, n in counted.items() if n >= 2)
                if best:
                    out[user] = best[0][1]
            elif kind == "first":
                out[user] = min(seen)[1]
            else:  # last: the latest time, ties to the smaller value
                latest = max(t for t, _ in seen)
                out[user] = min(v for t, v in seen if t == latest)
        return out


# -- random definitions ---------------------------------------------------------------------------

NUMERIC_OPS = ["=", "!=", ">", ">=", "<", "<=", "in", "not_in", "exists", "not_exists"]
TEXT_OPS = [*NUMERIC_OPS, "contains", "starts_with"]


def random_filter(rng: random.Random, subject: str, name: str, domain: list[Any]) \
        -> dict[str, Any]:
    present = [v for v in domain if v is not None]
    text = isinstance(present[0], str)
    op = rng.choice(TEXT_OPS if text else NUMERIC_OPS)
    f: dict[str, Any] = {subject: name, "op": op}
    if op in ("exists", "not_exists"):
        return f
    if op in ("in", "not_in"):
        f["value"] = rng.sample(present, rng.randint(1, 3))
    elif op in ("contains", "starts_with"):
        # % and _ are LIKE's wildcards: they must match only themselves
        f["value"] = rng.choice(["us", "u", "g", "pro", "es", "x", "", "premium", "%", "_",
                                 "0%_", "5"])
    else:
        f["value"] = rng.choice([*present, "zz" if text else 7.0])
    return f


def _window_raw(rng: random.Random) -> dict[str, Any]:
    pick = rng.random()
    if pick < 0.3:
        return {}
    if pick < 0.75:
        return {"within": rng.choice(list(DURATIONS))}
    return {"between": list(rng.choice(BETWEENS))}


def _filters(rng: random.Random, event: str, most: int = 2) -> list[dict[str, Any]]:
    props = PROPERTIES.get(event, {})
    if not props:
        return []
    return [random_filter(rng, "property", name, props[name])
            for name in rng.sample(list(props), min(len(props), rng.randint(0, most)))]


def random_condition(rng: random.Random, depth: int, refs: list[str]) -> dict[str, Any]:
    kinds = ["event", "event", "trait", "funnel", *(["audience"] if refs else [])]
    if depth > 0:
        kinds += ["all", "any", "none"]
    kind = rng.choice(kinds)
    if kind in ("all", "any", "none"):
        return {kind: [random_condition(rng, depth - 1, refs)
                       for _ in range(rng.randint(1, 3))]}
    if kind == "audience":
        return {"audience": rng.choice(refs)}
    if kind == "trait":
        name = rng.choice(list(TRAITS))
        return {"trait": random_filter(rng, "name", name, TRAITS[name])}
    if kind == "funnel":
        steps = []
        for i in range(rng.randint(2, 3)):
            event = rng.choice(EVENTS)
            step: dict[str, Any] = {"event": event}
            if rng.random() < 0.7:
                step["within"] = rng.choice(list(DURATIONS) if i else ["7d", "30d"])
            if (filters := _filters(rng, event, 1)):
                step["where"] = filters
            steps.append(step)
        return {"funnel": steps}
    event = rng.choice(EVENTS)
    cond: dict[str, Any] = {"event": event, **_window_raw(rng)}
    count = rng.choice([None, ("at_least", rng.randint(1, 3)), ("at_most", rng.randint(0, 2)),
                        ("exactly", rng.randint(0, 2))])
    if count:
        cond["count"] = {count[0]: count[1]}
    if (filters := _filters(rng, event)):
        cond["where"] = filters
    return cond


def random_where(rng: random.Random, refs: list[str] | None = None) -> list[Any]:
    return [random_condition(rng, 2, refs or []) for _ in range(rng.randint(1, 3))]


def random_compute(rng: random.Random, kind: str) -> dict[str, Any]:
    event = rng.choice(list(PROPERTIES) if kind != "count" else EVENTS)
    raw: dict[str, Any] = {}
    if kind == "count":
        raw["count"] = event
    else:
        raw[kind] = {"event": event, "property": rng.choice(list(PROPERTIES[event]))}
        if kind in ("sum", "avg", "min", "max"):  # numbers only
            numeric = {"Order Completed": "total", "Product Viewed": "price"}
            event = rng.choice(list(numeric))
            raw[kind] = {"event": event, "property": numeric[event]}
    raw.update(_window_raw(rng))
    if (filters := _filters(rng, event, 1)):
        raw["where"] = filters
    return raw
