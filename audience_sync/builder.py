"""The audience builder and computed-trait templates: YAML definitions parsed into frozen values.

Parsing is by hand rather than by pydantic unions so that a mistake deep in a nested
condition comes back as one line naming its exact path
(`audiences[2].where[1].count: give one of at_least, at_most, exactly`).
Semantics (DESIGN.md 6b, issue 13) live in compiler.py; this module only says what was asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

OPERATORS = ("=", "!=", ">", ">=", "<", "<=", "in", "not_in", "contains", "starts_with",
             "exists", "not_exists")
CONDITION_KINDS = ("event", "trait", "audience", "funnel", "all", "any", "none")
COUNT_KINDS = ("at_least", "at_most", "exactly")
AGGREGATES = ("sum", "avg", "min", "max")
COMPUTE_KINDS = ("count", *AGGREGATES, "most_frequent", "first", "last", "unique_list",
                 "unique_count")

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class DefinitionError(ValueError):
    """A malformed definition; `path` names where, the message says what."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


# -- values ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """(now - start, now - end]; start None means no bound at all (ever)."""

    start: timedelta | None = None
    end: timedelta = timedelta(0)


@dataclass(frozen=True)
class Filter:
    """`field op value` on a property (event table column) or a trait (users column)."""

    field: str
    op: str
    value: Any = None


@dataclass(frozen=True)
class EventCondition:
    event: str
    window: Window = Window()
    filters: tuple[Filter, ...] = ()
    count: Literal["at_least", "at_most", "exactly"] = "at_least"
    n: int = 1


@dataclass(frozen=True)
class TraitCondition:
    filter: Filter


@dataclass(frozen=True)
class AudienceRef:
    """`audience: KEY` as written; config load replaces it by Inlined (or QueryAudience)."""

    ref: str
    path: str = field(compare=False)


@dataclass(frozen=True)
class Inlined:
    key: str
    condition: Condition


@dataclass(frozen=True)
class QueryAudience:
    """A referenced audience defined by SQL: membership of its rows' user_id."""

    key: str
    query: str


@dataclass(frozen=True)
class FunnelStep:
    event: str
    within: timedelta | None = None  # the first step: before now; the others: after the previous
    filters: tuple[Filter, ...] = ()


@dataclass(frozen=True)
class Funnel:
    steps: tuple[FunnelStep, ...]


@dataclass(frozen=True)
class Group:
    kind: Literal["all", "any", "none"]
    conditions: tuple[Condition, ...]


Condition = (EventCondition | TraitCondition | AudienceRef | Inlined | QueryAudience | Funnel
             | Group)


@dataclass(frozen=True)
class Compute:
    """A computed-trait template: `kind` over `event` (and its `property`)."""

    kind: str
    event: str
    property: str | None = None
    window: Window = Window()
    filters: tuple[Filter, ...] = ()


Definition = Group | Compute


def to_plain(node: Any) -> Any:
    """A JSON-able form, for definition hashes and `compile`'s notes."""
    if isinstance(node, timedelta):
        return node.total_seconds()
    if isinstance(node, tuple | list):
        return [to_plain(v) for v in node]
    if hasattr(node, "__dataclass_fields__"):
        body = {name: to_plain(getattr(node, name)) for name in node.__dataclass_fields__
                if name != "path"}
        return {"type": type(node).__name__, **body}
    return node


# -- parsing --------------------------------------------------------------------------------------

def parse_duration(value: object, path: str) -> timedelta:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DefinitionError(path, "expected a duration such as 30s, 15m, 2h or 30d")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.match(value)
        if not match:
            raise DefinitionError(path, f"{value!r} is not a duration such as 30s, 15m, 2h "
                                        "or 30d")
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise DefinitionError(path, "must be longer than 0s")
    return timedelta(seconds=seconds)


def _mapping(value: object, path: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DefinitionError(path, f"expected {what}")
    return value


def _list(value: object, path: str, what: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise DefinitionError(path, f"expected a non-empty list of {what}")
    return value


def _only(raw: Mapping[str, Any], path: str, allowed: tuple[str, ...]) -> None:
    for key in raw:
        if key not in allowed:
            raise DefinitionError(f"{path}.{key}", "unknown setting")


def _name(value: object, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DefinitionError(path, "expected a non-empty name")
    return value


def _window(raw: Mapping[str, Any], path: str) -> Window:
    if "within" in raw and "between" in raw:
        raise DefinitionError(path, "give within or between, not both")
    if "within" in raw:
        return Window(parse_duration(raw["within"], f"{path}.within"))
    if "between" in raw:
        pair = raw["between"]
        if not isinstance(pair, list) or len(pair) != 2:
            raise DefinitionError(f"{path}.between", "expected two durations: [60d, 30d]")
        start = parse_duration(pair[0], f"{path}.between[0]")
        end = parse_duration(pair[1], f"{path}.between[1]")
        if start <= end:
            raise DefinitionError(f"{path}.between", "the first duration must be longer than "
                                                     "the second: [60d, 30d]")
        return Window(start, end)
    return Window()


def _scalar(value: object) -> bool:
    return isinstance(value, str | int | float)  # bool is an int


def parse_filter(raw: object, path: str, subject: Literal["property", "name"]) -> Filter:
    body = _mapping(raw, path, f"a mapping of {subject}, op and value")
    _only(body, path, (subject, "op", "value"))
    if subject not in body:
        raise DefinitionError(f"{path}.{subject}", "is required")
    name = _name(body[subject], f"{path}.{subject}")
    op = body.get("op")
    if op not in OPERATORS:
        raise DefinitionError(f"{path}.op", f"unknown operator {op!r} (one of "
                                            f"{' '.join(OPERATORS)})")
    value = body.get("value")
    if op in ("exists", "not_exists"):
        if value is not None:
            raise DefinitionError(f"{path}.value", f"{op} takes no value")
        return Filter(name, op)
    if "value" not in body or value is None:
        raise DefinitionError(f"{path}.value", "is required (a null matches only not_exists)")
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not value or not all(
                _scalar(v) for v in value):
            raise DefinitionError(f"{path}.value", f"{op} takes a non-empty list of values")
        return Filter(name, op, tuple(value))
    if op in ("contains", "starts_with") and not isinstance(value, str):
        raise DefinitionError(f"{path}.value", f"{op} takes a text value")
    if not _scalar(value):
        raise DefinitionError(f"{path}.value", "expected a text, number or boolean")
    return Filter(name, op, value)


def _filters(raw: Mapping[str, Any], path: str) -> tuple[Filter, ...]:
    if "where" not in raw:
        return ()
    items = _list(raw["where"], f"{path}.where", "property filters")
    return tuple(parse_filter(f, f"{path}.where[{i}]", "property") for i, f in enumerate(items))


def _event_condition(raw: Mapping[str, Any], path: str) -> EventCondition:
    _only(raw, path, ("event", "within", "between", "count", "where"))
    event = _name(raw["event"], f"{path}.event")
    kind: Literal["at_least", "at_most", "exactly"] = "at_least"
    n: Any = 1
    if "count" in raw:
        count = raw["count"]
        if not isinstance(count, Mapping) or len(count) != 1 or \
                next(iter(count)) not in COUNT_KINDS:
            raise DefinitionError(f"{path}.count", "give one of at_least, at_most, exactly")
        kind, n = next(iter(count.items()))  # kind is checked against COUNT_KINDS above
        if isinstance(n, bool) or not isinstance(n, int) or n < (1 if kind == "at_least" else 0):
            raise DefinitionError(f"{path}.count.{kind}", "expected a whole number, at least "
                                  + ("1" if kind == "at_least" else "0"))
    return EventCondition(event, _window(raw, path), _filters(raw, path), kind, n)


def _funnel(raw: object, path: str) -> Funnel:
    steps = []
    items = _list(raw, path, "steps")
    if len(items) < 2:
        raise DefinitionError(path, "a funnel needs at least two steps")
    for i, item in enumerate(items):
        step_path = f"{path}[{i}]"
        body = _mapping(item, step_path, "a step: {event: ..., within: ...}")
        _only(body, step_path, ("event", "within", "where"))
        if "event" not in body:
            raise DefinitionError(f"{step_path}.event", "is required")
        within = parse_duration(body["within"], f"{step_path}.within") \
            if "within" in body else None
        steps.append(FunnelStep(_name(body["event"], f"{step_path}.event"), within,
                                _filters(body, step_path)))
    return Funnel(tuple(steps))


def parse_condition(raw: object, path: str) -> Condition:
    body = _mapping(raw, path, "a condition: " + ", ".join(CONDITION_KINDS))
    kinds = [k for k in CONDITION_KINDS if k in body]
    if len(kinds) != 1:
        unknown = [k for k in body if k not in ("within", "between", "count", "where")]
        if not kinds and unknown:
            raise DefinitionError(f"{path}.{unknown[0]}", "unknown condition (give one of "
                                  + ", ".join(CONDITION_KINDS) + ")")
        raise DefinitionError(path, "give one of " + ", ".join(CONDITION_KINDS))
    kind = kinds[0]
    if kind == "event":
        return _event_condition(body, path)
    _only(body, path, (kind,))
    value = body[kind]
    if kind == "trait":
        return TraitCondition(parse_filter(value, f"{path}.trait", "name"))
    if kind == "audience":
        return AudienceRef(_name(value, f"{path}.audience"), f"{path}.audience")
    if kind == "funnel":
        return _funnel(value, f"{path}.funnel")
    items = _list(value, f"{path}.{kind}", "conditions")
    group: Literal["all", "any", "none"] = kind  # type: ignore[assignment]
    return Group(group, tuple(parse_condition(c, f"{path}.{kind}[{i}]")
                              for i, c in enumerate(items)))


def parse_where(raw: object, path: str) -> Group:
    """An audience's top-level `where:`: a list read as `all`."""
    items = _list(raw, path, "conditions")
    return Group("all", tuple(parse_condition(c, f"{path}[{i}]") for i, c in enumerate(items)))


def parse_compute(raw: object, path: str) -> Compute:
    body = _mapping(raw, path, "a mapping such as {count: Order Completed, within: 90d}")
    kinds = [k for k in COMPUTE_KINDS if k in body]
    if len(kinds) != 1:
        raise DefinitionError(path, "give one of " + ", ".join(COMPUTE_KINDS))
    kind = kinds[0]
    _only(body, path, (kind, "within", "between", "where"))
    if kind == "count":
        event, prop = _name(body[kind], f"{path}.count"), None
    else:
        target = _mapping(body[kind], f"{path}.{kind}", "{event: ..., property: ...}")
        _only(target, f"{path}.{kind}", ("event", "property"))
        for needed in ("event", "property"):
            if needed not in target:
                raise DefinitionError(f"{path}.{kind}.{needed}", "is required")
        event = _name(target["event"], f"{path}.{kind}.event")
        prop = _name(target["property"], f"{path}.{kind}.property")
    return Compute(kind, event, prop, _window(body, path), _filters(body, path))


def rule_condition(event: str, within: timedelta, at_least: int, at_most: int | None,
                   not_performed: bool) -> Condition:
    """A `rule:` audience as builder conditions, for audiences that reference it."""
    window = Window(within)
    if not_performed:
        return Group("none", (EventCondition(event, window),))
    least = EventCondition(event, window, (), "at_least", at_least)
    if at_most is None:
        return least
    return Group("all", (least, EventCondition(event, window, (), "at_most", at_most)))


# -- references -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Audience:
    """What reference resolution needs to know of each audience of the config."""

    key: str
    name: str
    path: str
    source: str
    condition: Condition | None  # None: defined by SQL (`query`)
    query: str | None = None
    account: bool = False  # level: account (its members are accounts, not users)


def inline_references(audiences: list[Audience]) -> dict[str, Condition]:
    """Each builder audience's condition with every `audience:` replaced by the referenced
    definition; a cycle, an unknown audience or another source is a DefinitionError."""
    by_ref: dict[str, Audience] = {}
    for aud in audiences:
        by_ref.setdefault(aud.key, aud)
        by_ref.setdefault(aud.name.casefold(), aud)
    done: dict[str, Condition] = {}

    def resolve(aud: Audience, chain: tuple[str, ...]) -> Condition:
        if aud.key in done:
            return done[aud.key]
        assert aud.condition is not None
        result = _replace(aud.condition, lambda ref: visit(aud, ref, chain))
        done[aud.key] = result
        return result

    def visit(owner: Audience, ref: AudienceRef, chain: tuple[str, ...]) -> Condition:
        target = by_ref.get(ref.ref) or by_ref.get(ref.ref.casefold())
        if target is None:
            raise DefinitionError(ref.path, f"unknown audience {ref.ref!r}")
        if target.source != owner.source:
            raise DefinitionError(ref.path, f"audience {target.key!r} reads source "
                                  f"{target.source!r}, not {owner.source!r}")
        if target.account:
            raise DefinitionError(ref.path, f"audience {target.key!r} is an account audience "
                                  "(level: account): its members are accounts, not users")
        if target.key in chain:
            cycle = " -> ".join((*chain[chain.index(target.key):], target.key))
            raise DefinitionError(ref.path, f"a cycle of audience references: {cycle}")
        if target.condition is None:
            assert target.query is not None
            return QueryAudience(target.key, target.query)
        return Inlined(target.key, resolve(target, (*chain, target.key)))

    for aud in audiences:
        if aud.condition is not None:
            resolve(aud, (aud.key,))
    return done


def _replace(cond: Condition, on_ref: Callable[[AudienceRef], Condition]) -> Condition:
    if isinstance(cond, AudienceRef):
        return on_ref(cond)
    if isinstance(cond, Group):
        return Group(cond.kind, tuple(_replace(c, on_ref) for c in cond.conditions))
    return cond
