"""`where:` and `compute:` at config load: every malformed form is one line naming its path;
audience references are inlined, checked for cycles and for their source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from audience_sync import builder
from audience_sync.config import load_config
from audience_sync.errors import ConfigError
from tests.helpers import write_config

ORDERS = {"event": "Order Completed", "within": "30d"}


def _load(tmp_path: Path, audiences: list[dict[str, Any]],
          traits: list[dict[str, Any]] | None = None, sources: int = 1) -> Any:
    document = {
        "sources": {f"s{i}": {"url": "sqlite:///w.db"} for i in range(sources)},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": a.get("key", "a"), "source": "s0", "destinations": ["file"], **a}
                      for a in audiences],
        "computed_traits": [{"name": t.get("key", "t"), "source": "s0",
                             "destinations": ["file"], **t} for t in traits or []],
    }
    if not document["computed_traits"]:
        del document["computed_traits"]
    return load_config(write_config(tmp_path / "config.yaml", document), env={})


def _error(tmp_path: Path, audiences: list[dict[str, Any]],
           traits: list[dict[str, Any]] | None = None, sources: int = 1) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, audiences, traits, sources)
    message = caught.value.message
    assert "\n" not in message
    return message


MALFORMED_WHERE = [
    ({"event": "A"}, "audiences[0].where: expected a non-empty list of conditions"),
    ([], "audiences[0].where: expected a non-empty list of conditions"),
    ([{"within": "30d"}], "audiences[0].where[0]: give one of event, trait, audience, funnel, "
                          "all, any, none"),
    ([{"evnt": "A"}], "audiences[0].where[0].evnt: unknown condition (give one of event, "
                      "trait, audience, funnel, all, any, none)"),
    ([{"event": "A", "trait": {"name": "plan", "op": "exists"}}],
     "audiences[0].where[0]: give one of event, trait, audience, funnel, all, any, none"),
    ([ORDERS, {**ORDERS, "count": {"at_leest": 2}}],
     "audiences[0].where[1].count: give one of at_least, at_most, exactly"),
    ([{**ORDERS, "count": {"at_least": 1, "at_most": 3}}],
     "audiences[0].where[0].count: give one of at_least, at_most, exactly"),
    ([{**ORDERS, "count": 2}], "audiences[0].where[0].count: give one of at_least, at_most, "
                               "exactly"),
    ([{**ORDERS, "count": {"at_most": -1}}],
     "audiences[0].where[0].count.at_most: expected a whole number, at least 0"),
    ([{**ORDERS, "count": {"at_least": 0}}],
     "audiences[0].where[0].count.at_least: expected a whole number, at least 1"),
    ([{"event": "A", "within": "30 days"}],
     "audiences[0].where[0].within: '30 days' is not a duration such as 30s, 15m, 2h or 30d"),
    ([{"event": "A", "within": "0d"}], "audiences[0].where[0].within: must be longer than 0s"),
    ([{"event": "A", "within": "30d", "between": ["60d", "30d"]}],
     "audiences[0].where[0]: give within or between, not both"),
    ([{"event": "A", "between": ["30d", "60d"]}],
     "audiences[0].where[0].between: the first duration must be longer than the second: "
     "[60d, 30d]"),
    ([{"event": "A", "between": "60d"}],
     "audiences[0].where[0].between: expected two durations: [60d, 30d]"),
    ([{"event": "A", "wthin": "3d"}], "audiences[0].where[0].wthin: unknown setting"),
    ([{"event": ""}], "audiences[0].where[0].event: expected a non-empty name"),
    ([{"event": "A", "where": [{"property": "total", "op": "~", "value": 1}]}],
     "audiences[0].where[0].where[0].op: unknown operator '~' (one of = != > >= < <= in "
     "not_in contains starts_with exists not_exists)"),
    ([{"event": "A", "where": [{"property": "total", "op": ">"}]}],
     "audiences[0].where[0].where[0].value: is required (a null matches only not_exists)"),
    ([{"event": "A", "where": [{"property": "total", "op": "=", "value": None}]}],
     "audiences[0].where[0].where[0].value: is required (a null matches only not_exists)"),
    ([{"event": "A", "where": [{"property": "c", "op": "in", "value": "usd"}]}],
     "audiences[0].where[0].where[0].value: in takes a non-empty list of values"),
    ([{"event": "A", "where": [{"property": "c", "op": "not_in", "value": []}]}],
     "audiences[0].where[0].where[0].value: not_in takes a non-empty list of values"),
    ([{"event": "A", "where": [{"property": "c", "op": "contains", "value": 5}]}],
     "audiences[0].where[0].where[0].value: contains takes a text value"),
    ([{"event": "A", "where": [{"property": "c", "op": "exists", "value": 5}]}],
     "audiences[0].where[0].where[0].value: exists takes no value"),
    ([{"event": "A", "where": [{"property": "c", "op": "=", "value": {"a": 1}}]}],
     "audiences[0].where[0].where[0].value: expected a text, number or boolean"),
    ([{"event": "A", "where": [{"op": "exists"}]}],
     "audiences[0].where[0].where[0].property: is required"),
    ([{"event": "A", "where": [{"property": "c", "op": "exists", "nme": 1}]}],
     "audiences[0].where[0].where[0].nme: unknown setting"),
    ([{"trait": {"op": "exists"}}], "audiences[0].where[0].trait.name: is required"),
    ([{"trait": "plan"}], "audiences[0].where[0].trait: expected a mapping of name, op and "
                          "value"),
    ([{"funnel": [ORDERS]}], "audiences[0].where[0].funnel: a funnel needs at least two steps"),
    ([{"funnel": [ORDERS, {"event": "B", "count": {"at_least": 2}}]}],
     "audiences[0].where[0].funnel[1].count: unknown setting"),
    ([{"funnel": [ORDERS, {"within": "7d"}]}],
     "audiences[0].where[0].funnel[1].event: is required"),
    ([{"all": []}], "audiences[0].where[0].all: expected a non-empty list of conditions"),
    ([{"any": [ORDERS, {"none": [{"event": "A", "count": {"exactly": "2"}}]}]}],
     "audiences[0].where[0].any[1].none[0].count.exactly: expected a whole number, at least 0"),
    ([{"none": ORDERS}], "audiences[0].where[0].none: expected a non-empty list of conditions"),
    ([{"audience": ""}], "audiences[0].where[0].audience: expected a non-empty name"),
    ([{"audience": "nope"}], "audiences[0].where[0].audience: unknown audience 'nope'"),
    (["Order Completed"], "audiences[0].where[0]: expected a condition: event, trait, audience, "
                          "funnel, all, any, none"),
]


@pytest.mark.parametrize(("where", "expected"), MALFORMED_WHERE,
                         ids=[str(i) for i in range(len(MALFORMED_WHERE))])
def test_malformed_where_is_one_line_naming_its_path(
        tmp_path: Path, where: Any, expected: str) -> None:
    assert _error(tmp_path, [{"where": where}]) == expected


MALFORMED_COMPUTE = [
    ({"within": "30d"}, "computed_traits[0].compute: give one of count, sum, avg, min, max, "
                        "most_frequent, first, last, unique_list, unique_count"),
    ({"count": "A", "sum": {"event": "A", "property": "t"}},
     "computed_traits[0].compute: give one of count, sum, avg, min, max, most_frequent, "
     "first, last, unique_list, unique_count"),
    ({"sum": {"event": "A"}}, "computed_traits[0].compute.sum.property: is required"),
    ({"first": {"property": "plan"}}, "computed_traits[0].compute.first.event: is required"),
    ({"avg": "Order Completed"}, "computed_traits[0].compute.avg: expected {event: ..., "
                                 "property: ...}"),
    ({"count": "A", "within": "soon"},
     "computed_traits[0].compute.within: 'soon' is not a duration such as 30s, 15m, 2h or 30d"),
    ({"count": "A", "count_distinct": True}, "computed_traits[0].compute.count_distinct: "
                                             "unknown setting"),
    ({"unique_list": {"event": "A", "property": "c", "extra": 1}},
     "computed_traits[0].compute.unique_list.extra: unknown setting"),
    ({"count": "A", "where": [{"property": "c", "op": "like", "value": "x"}]},
     "computed_traits[0].compute.where[0].op: unknown operator 'like' (one of = != > >= < <= "
     "in not_in contains starts_with exists not_exists)"),
    ("count A", "computed_traits[0].compute: expected a mapping such as {count: Order "
                "Completed, within: 90d}"),
]


@pytest.mark.parametrize(("compute", "expected"), MALFORMED_COMPUTE,
                         ids=[str(i) for i in range(len(MALFORMED_COMPUTE))])
def test_malformed_compute_is_one_line_naming_its_path(
        tmp_path: Path, compute: Any, expected: str) -> None:
    assert _error(tmp_path, [{"query": "SELECT 1 AS user_id"}],
                  [{"compute": compute}]) == expected


def test_an_audience_takes_one_definition(tmp_path: Path) -> None:
    assert _error(tmp_path, [{"query": "SELECT 1 AS user_id", "where": [ORDERS]}]) == \
        "audiences[0]: give exactly one of query, rule or where"
    assert _error(tmp_path, [{"key": "a"}]) == \
        "audiences[0]: give exactly one of query, rule or where"


def test_a_trait_takes_query_or_compute(tmp_path: Path) -> None:
    both = {"query": "SELECT 1 AS user_id, 1 AS value", "compute": {"count": "A"}}
    assert _error(tmp_path, [{"where": [ORDERS]}], [both]) == \
        "computed_traits[0]: give exactly one of query or compute"
    assert _error(tmp_path, [{"where": [ORDERS]}], [{"key": "t"}]) == \
        "computed_traits[0]: give exactly one of query or compute"


def test_a_cycle_of_audience_references_is_named(tmp_path: Path) -> None:
    message = _error(tmp_path, [
        {"key": "a", "where": [ORDERS, {"audience": "b"}]},
        {"key": "b", "where": [{"any": [{"audience": "c"}]}]},
        {"key": "c", "where": [{"none": [{"audience": "a"}]}]},
    ])
    assert message == ("audiences[2].where[0].none[0].audience: a cycle of audience "
                       "references: a -> b -> c -> a")


def test_an_audience_referencing_itself_is_a_cycle(tmp_path: Path) -> None:
    assert _error(tmp_path, [{"key": "a", "where": [{"audience": "a"}]}]) == \
        "audiences[0].where[0].audience: a cycle of audience references: a -> a"


def test_a_referenced_audience_must_read_the_same_source(tmp_path: Path) -> None:
    message = _error(tmp_path, [
        {"key": "a", "where": [{"audience": "b"}]},
        {"key": "b", "source": "s1", "where": [ORDERS]},
    ], sources=2)
    assert message == "audiences[0].where[0].audience: audience 'b' reads source 's1', not 's0'"


def test_references_are_inlined_by_key_or_name(tmp_path: Path) -> None:
    config = _load(tmp_path, [
        {"key": "a", "where": [{"audience": "B Audience"}, {"audience": "c"}]},
        {"key": "b", "name": "B Audience", "where": [ORDERS]},
        {"key": "c", "rule": {"event": "Signed Up", "within": "7d", "not_performed": True}},
        {"key": "d", "query": "SELECT id AS user_id FROM users", "where": None},
        {"key": "e", "where": [{"audience": "d"}]},
    ])
    a = config.find("a").definition
    assert a == builder.Group("all", (
        builder.Inlined("b", builder.Group("all", (builder.EventCondition(
            "Order Completed", builder.Window(builder.parse_duration("30d", "")),),))),
        builder.Inlined("c", builder.Group("none", (builder.EventCondition(
            "Signed Up", builder.Window(builder.parse_duration("7d", ""))),))),
    ))
    assert config.find("e").definition == builder.Group("all", (
        builder.QueryAudience("d", "SELECT id AS user_id FROM users"),))


def test_definition_hash_follows_the_referenced_definition(tmp_path: Path) -> None:
    def hashes(within: str) -> tuple[str, str]:
        config = _load(tmp_path, [
            {"key": "a", "where": [{"audience": "b"}]},
            {"key": "b", "where": [{"event": "Order Completed", "within": within}]},
        ], [{"key": "t", "compute": {"count": "Order Completed", "within": within}}])
        return config.find("a").definition_hash, config.find("t").definition_hash

    assert hashes("30d")[0] != hashes("7d")[0]  # a's members change when b's definition does
    assert hashes("30d")[1] != hashes("7d")[1]
    assert hashes("30d") == hashes("30d")


def test_event_tables_can_be_named_per_event(tmp_path: Path) -> None:
    document = {
        "sources": {"s0": {"url": "sqlite:///w.db", "tables": {
            "events": {"Order Completed": "shop.orders"}}}},
        "destinations": {"file": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": "a", "source": "s0", "destinations": ["file"],
                       "where": [ORDERS]}],
    }
    config = load_config(write_config(tmp_path / "config.yaml", document), env={})
    assert config.sources["s0"].tables.events == {"Order Completed": "shop.orders"}
