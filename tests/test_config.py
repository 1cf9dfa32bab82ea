"""Config: good configs load into frozen values; every bad one is one line, exit 2, no files."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_sync.config import (
    PlanhatDestination,
    RateLimit,
    SegmentDestination,
    load_config,
    parse_duration,
    parse_rate,
)
from audience_sync.errors import ConfigError
from tests.helpers import cli, write_config

BASE: dict[str, Any] = {
    "state_db": "sqlite:///state.db",
    "sources": {"warehouse": {"url": "sqlite:///warehouse.db"}},
    "destinations": {
        "planhat": {"type": "planhat", "tenant_token": "${PH_TOKEN}"},
        "file": {"type": "jsonl", "path": "out/identify.jsonl"},
    },
    "audiences": [
        {"name": "Order Completed Last 30 Days", "source": "warehouse",
         "rule": {"event": "Order Completed", "within": "30d", "at_least": 1},
         "destinations": ["planhat"]},
        {"name": "High Value", "key": "high_value", "source": "warehouse",
         "query": "SELECT id AS user_id FROM users", "destinations": ["planhat", "file"],
         "schedule": {"every": "3h"}},
    ],
    "computed_traits": [
        {"name": "Orders Last 90 Days", "source": "warehouse",
         "query": "SELECT user_id, 1 AS value FROM tracks", "destinations": ["file"]},
    ],
}
ENV = {"PH_TOKEN": "secret-tenant-token-123"}


def test_good_config_loads(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.yaml", BASE)
    config = load_config(path, env=ENV)
    keys = [c.key for c in config.computations]
    assert keys == ["order_completed_last_30_days", "high_value", "orders_last_90_days"]
    high = config.find("High Value")
    assert high.every == timedelta(hours=3)
    assert config.find("high_value") is high
    assert config.computations[0].every == timedelta(hours=2)
    assert config.computations[2].kind == "trait"
    # Relative SQLite paths are relative to the config file, not the working directory.
    assert config.state_db == f"sqlite:///{tmp_path / 'state.db'}"
    assert config.sources["warehouse"].url == f"sqlite:///{tmp_path / 'warehouse.db'}"
    planhat = config.destinations["planhat"]
    assert "secret-tenant-token-123" not in repr(planhat)
    assert "secret-tenant-token-123" not in repr(config)


def test_destination_defaults(tmp_path: Path) -> None:
    document = {**BASE, "destinations": {
        **BASE["destinations"],
        "segment": {"type": "segment", "write_key": "${SEG_KEY}"},
        "fields": {"type": "planhat", "mode": "api", "api_token": "${PH_TOKEN}"}}}
    config = load_config(write_config(tmp_path / "config.yaml", document),
                         env={**ENV, "SEG_KEY": "k"})
    planhat, segment, fields = (config.destinations[n] for n in ("planhat", "segment", "fields"))
    assert isinstance(planhat, PlanhatDestination) and isinstance(fields, PlanhatDestination)
    assert isinstance(segment, SegmentDestination)
    # Requests on the wire: Planhat's one identify per request needs several to reach its
    # rate; Segment's batches go two at a time; bulk upserts are sequential by Planhat's rule.
    assert (planhat.concurrency, segment.concurrency) == (4, 2)
    assert planhat.effective_rate_limit == RateLimit(100, 1)
    assert fields.effective_rate_limit == RateLimit(200, 60)
    assert segment.rate_limit == RateLimit(500, 1)


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "config.yaml", BASE), env=ENV)
    with pytest.raises(Exception):  # noqa: B017 - pydantic and dataclasses raise differently
        config.model.schedule.every = timedelta(0)  # type: ignore[misc]


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("2h", timedelta(hours=2)),
    ("30d", timedelta(days=30)), (45, timedelta(seconds=45)), (" 1h ", timedelta(hours=1)),
])
def test_durations(text: Any, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["2 hours", "h", "-1h", "1.5h", "", True, "2w"])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_rates() -> None:
    assert parse_rate("100/s") == RateLimit(100, 1)
    assert parse_rate("200/min").per_second == pytest.approx(200 / 60)
    with pytest.raises(ValueError):
        parse_rate("fast")


def _mutate(change: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    change(doc)
    return doc


BAD: list[tuple[str, Any, str]] = [
    ("unknown top-level key", lambda d: d.update(stat_db="x"), "stat_db: unknown setting"),
    ("unknown audience key", lambda d: d["audiences"][0].update(destination=["planhat"]),
     "audiences[0].destination: unknown setting"),
    ("unknown source", lambda d: d["audiences"][1].update(source="warehose"),
     "audiences[1].source: unknown source 'warehose'"),
    ("unknown destination", lambda d: d["audiences"][0].update(destinations=["plnhat"]),
     "audiences[0].destinations[0]: unknown destination 'plnhat'"),
    ("key collision by name", lambda d: d["audiences"].append(
        {"name": "order completed last 30 days", "source": "warehouse", "query": "SELECT 1",
         "destinations": ["file"]}),
     "audiences[2].name: key 'order_completed_last_30_days' is already used by audiences[0]"),
    ("key collision trait vs audience", lambda d: d["computed_traits"][0].update(key="high_value"),
     "computed_traits[0].key: key 'high_value' is already used by audiences[1]"),
    ("bad duration", lambda d: d.update(schedule={"every": "2 hours"}),
     "schedule.every: '2 hours' is not a duration"),
    ("bad rule window", lambda d: d["audiences"][0]["rule"].update(within="soon"),
     "audiences[0].rule.within"),
    ("missing env var", lambda d: d["destinations"]["planhat"].update(
        tenant_token="${NOT_SET_ANYWHERE}"),
     "destinations.planhat.tenant_token: environment variable NOT_SET_ANYWHERE is not set"),
    ("wrong type", lambda d: d["audiences"][0]["rule"].update(at_least="many"),
     "audiences[0].rule.at_least"),
    ("empty audiences", lambda d: d.update(audiences=[], computed_traits=[]),
     "audiences: at least one audience or computed trait is required"),
    ("bad explicit key", lambda d: d["audiences"][1].update(key="High-Value"),
     "audiences[1].key: key 'High-Value' must match"),
    ("query and rule", lambda d: d["audiences"][0].update(query="SELECT 1"),
     "audiences[0]: give exactly one of query, rule or where"),
    ("neither query nor rule", lambda d: d["audiences"][1].pop("query"),
     "audiences[1]: give exactly one of query, rule or where"),
    ("unknown destination type", lambda d: d["destinations"].update(x={"type": "braze"}),
     "destinations.x"),
    ("planhat without token", lambda d: d["destinations"]["planhat"].pop("tenant_token"),
     "destinations.planhat: tenant_token is required"),
    ("api mode without api token", lambda d: d["destinations"]["planhat"].update(mode="api"),
     "destinations.planhat: api_token is required"),
    ("bad mode", lambda d: d["destinations"]["planhat"].update(mode="bulk"),
     "destinations.planhat.mode"),
    ("bad fraction", lambda d: d.update(schedule={"max_removal_fraction": 1.5}),
     "schedule.max_removal_fraction"),
    ("bad state url", lambda d: d.update(state_db="not a url"),
     "state_db: is not a valid database URL"),
    ("mysql state db", lambda d: d.update(state_db="mysql://x@y/z"),
     "state_db: the state database must be SQLite or PostgreSQL"),
    ("no destinations", lambda d: d["audiences"][0].update(destinations=[]),
     "audiences[0].destinations"),
    ("missing name", lambda d: d["audiences"][0].pop("name"), "audiences[0].name: is required"),
    ("unusable name", lambda d: d["audiences"][0].update(name="!!!"),
     "audiences[0].name: name '!!!' has no letters or digits"),
    ("sources not a mapping", lambda d: d.update(sources=["warehouse"]), "sources"),
    ("bad rate limit", lambda d: d["destinations"]["planhat"].update(rate_limit="lots"),
     "destinations.planhat.rate_limit: 'lots' is not a rate"),
    ("duplicate destination in list", lambda d: d["audiences"][1].update(
        destinations=["file", "file"]), "audiences[1].destinations: lists a destination twice"),
]


@pytest.mark.parametrize(("mutation", "expected"), [(m, e) for _, m, e in BAD],
                         ids=[name for name, _, _ in BAD])
def test_bad_config_is_one_line_exit_2_nothing_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        mutation: Any, expected: str) -> None:
    monkeypatch.setenv("PH_TOKEN", ENV["PH_TOKEN"])
    path = write_config(tmp_path / "config.yaml", _mutate(mutation))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = cli(capsys, "--config", str(path), "status")
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert ENV["PH_TOKEN"] not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("text", "expected"), [
    ("audiences: [\n", "config.yaml: "),
    ("- just\n- a list\n", "the top level must be a mapping"),
])
def test_unparseable_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                          expected: str) -> None:
    path = write_config(tmp_path / "config.yaml", text)
    code, _, err = cli(capsys, "--config", str(path), "status")
    assert code == 2
    assert expected in err and len(err.strip().splitlines()) == 1


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--config", str(tmp_path / "nope.yaml"), "status")
    assert code == 2
    assert "nope.yaml not found" in err


def test_secret_not_echoed_in_type_errors(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    doc = copy.deepcopy(BASE)
    doc["destinations"]["planhat"]["tenant_token"] = ["secret-in-a-list-999"]
    path = write_config(tmp_path / "config.yaml", doc)
    code, _, err = cli(capsys, "--config", str(path), "check")
    assert code == 2
    assert "destinations.planhat.tenant_token" in err
    assert "secret-in-a-list-999" not in err


def test_config_from_environment_variable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    doc = copy.deepcopy(BASE)
    doc["destinations"]["planhat"]["tenant_token"] = "literal"
    path = write_config(tmp_path / "custom.yaml", doc)
    monkeypatch.setenv("AUDIENCE_SYNC_CONFIG", str(path))
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "status", "--json")
    assert code == 0
    assert yaml.safe_load(out)["computations"][0]["key"] == "order_completed_last_30_days"


def test_error_class_carries_field() -> None:
    error = ConfigError("audiences[0].source", "unknown source 'x'")
    assert error.exit_code == 2 and error.field == "audiences[0].source"
