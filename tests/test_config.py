"""Config: good configs load into frozen values; every bad one is one line, exit 2, no files."""

from __future__ import annotations

import copy
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_sync.config import (
    PlanhatConfig,
    RateLimit,
    SegmentConfig,
    load_config,
    parse_duration,
    parse_rate,
)
from audience_sync.errors import ConfigError
from audience_sync.state.store import Store
from audience_sync.urls import mask_url, mask_urls_in
from tests.delivery_setup import API_TOKEN, TENANT_TOKEN, WRITE_KEY, delivery_config, set_env
from tests.fakes import FakePlanhat, FakeSegment
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
    assert isinstance(planhat, PlanhatConfig) and isinstance(fields, PlanhatConfig)
    assert isinstance(segment, SegmentConfig)
    # Requests on the wire: Planhat's one identify per request needs several to reach its
    # rate; Segment's batches go two at a time; bulk upserts are sequential by Planhat's rule.
    assert (planhat.concurrency, segment.concurrency) == (4, 2)
    assert planhat.effective_rate_limit == RateLimit(100, 1)
    assert fields.effective_rate_limit == RateLimit(200, 60)
    assert segment.rate_limit == RateLimit(500, 1)


def test_bundled_config_has_an_account_audience(tmp_path: Path) -> None:
    """The demo's config.yaml loads; its account audience goes to `file` as group calls, and
    the warehouse's account_users lets a destination fan it out (Planhat, as its comment says)."""
    bundled = Path(__file__).resolve().parent.parent / "config.yaml"
    config = load_config(bundled, env={})
    accounts = [c for c in config.computations if c.level == "account"]
    assert [c.key for c in accounts] == ["accounts_with_active_buyers"]
    (audience,) = accounts
    assert audience.outbox_calls == (("file", "group"),) and not audience.fanned_out
    assert config.sources["warehouse"].account_users is not None
    document = yaml.safe_load(bundled.read_text())
    document["destinations"]["planhat"] = {"type": "planhat", "tenant_token": "t",
                                           "subdomain": "api"}
    for item in document["audiences"]:
        if item.get("level") == "account":
            item["destinations"].append("planhat")
    fanned = load_config(write_config(tmp_path / "config.yaml", document), env={}) \
        .find("accounts_with_active_buyers")
    assert fanned.outbox_calls == (("file", "group"), ("planhat", "identify"))
    assert fanned.fanned_out


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
    # Keys that name a contact trait or an identity field: `true` would replace the contact's
    # email (or its id) in every identify.
    ("audience named Email", lambda d: d["audiences"][0].update(name="Email"),
     "audiences[0].name: key 'email' collides with the contact field 'email'"),
    ("audience named Title", lambda d: d["audiences"][0].update(name="Title"),
     "audiences[0].name: key 'title' collides"),
    ("explicit key company_id", lambda d: d["audiences"][1].update(key="company_id"),
     "audiences[1].key: key 'company_id' collides with the contact field 'company_id'"),
    ("audience named ExternalId", lambda d: d["audiences"][0].update(name="externalId"),
     "audiences[0].name: key 'external_id' collides with the contact field 'externalId'"),
    ("trait named User ID", lambda d: d["computed_traits"][0].update(name="User ID"),
     "computed_traits[0].name: key 'user_id' collides"),
    ("explicit key id", lambda d: d["computed_traits"][0].update(key="id"),
     "computed_traits[0].key: key 'id' collides"),
    # Durations and rates are bounded before they become timedeltas and request intervals:
    # these validated and then raised OverflowError in every sync.
    ("every of ten thousand years", lambda d: d.update(schedule={"every": "3650000d"}),
     "schedule.every: is longer than the maximum of 365d"),
    ("every of 99999999999 days", lambda d: d["audiences"][1].update(
        schedule={"every": "99999999999d"}),
     "audiences[1].schedule.every: is longer than the maximum of 365d"),
    ("every of a 5000-digit number", lambda d: d.update(schedule={"every": "9" * 5000 + "d"}),
     "schedule.every: is longer than the maximum of 365d"),
    ("every infinite", lambda d: d.update(schedule={"every": float("inf")}),
     "schedule.every: expected a duration"),
    ("jitter NaN", lambda d: d.update(schedule={"jitter": float("nan")}),
     "schedule.jitter: expected a duration"),
    ("tick a huge integer", lambda d: d.update(schedule={"tick": 10 ** 30}),
     "schedule.tick: is longer than the maximum of 365d"),
    ("timeout a huge float", lambda d: d["destinations"]["planhat"].update(timeout=1e300),
     "destinations.planhat.timeout: is longer than the maximum of 365d"),
    ("retry_later infinite", lambda d: d["destinations"]["planhat"].update(
        retry_later=float("inf")), "destinations.planhat.retry_later: expected a duration"),
    ("rule window past a century", lambda d: d["audiences"][0]["rule"].update(within="36501d"),
     "audiences[0].rule.within: is longer than the maximum of 36500d"),
    ("rule count past a SQL integer", lambda d: d["audiences"][0]["rule"].update(
        at_least=10 ** 20), "audiences[0].rule.at_least"),
    ("rate of a 400-digit number", lambda d: d["destinations"]["planhat"].update(
        rate_limit="9" * 400 + "/s"), "destinations.planhat.rate_limit: "),
    ("rate slower than one an hour", lambda d: d["destinations"]["planhat"].update(
        rate_limit="0.5/h"), "destinations.planhat.rate_limit: '0.5/h' is outside"),
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


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], path: Path,
                     *args: str) -> str:
    code, out, err = cli(capsys, "--config", str(path), *(args or ("status",)))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1, err
    return lines[0]


# -- secrets --------------------------------------------------------------------------------------

def test_secrets_are_stripped_of_surrounding_whitespace(tmp_path: Path) -> None:
    document = {**BASE, "destinations": {
        **BASE["destinations"],
        "segment": {"type": "segment", "write_key": "${SEG_KEY}"},
        "fields": {"type": "planhat", "mode": "api", "api_token": "${API_TOKEN}"}}}
    # A file-mounted secret ends in a newline (and sometimes \r\n, or padding).
    env = {"PH_TOKEN": "tenant-tok\n", "SEG_KEY": "  seg-key\r\n", "API_TOKEN": "\tapi-tok \n"}
    config = load_config(write_config(tmp_path / "config.yaml", document), env=env)
    planhat, segment, fields = (config.destinations[n] for n in ("planhat", "segment", "fields"))
    assert isinstance(planhat, PlanhatConfig) and isinstance(fields, PlanhatConfig)
    assert isinstance(segment, SegmentConfig)
    assert planhat.tenant_token is not None and fields.api_token is not None
    assert planhat.tenant_token.get_secret_value() == "tenant-tok"
    assert segment.write_key.get_secret_value() == "seg-key"
    assert fields.api_token.get_secret_value() == "api-tok"


@pytest.mark.parametrize("inside", ["\n", "\r", "\x00", "\t", "\x1b", "\x7f", "\u2028"])
def test_control_character_inside_a_secret_is_refused_without_printing_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], inside: str) -> None:
    halves = ("secret-part-one", "secret-part-two")
    doc = copy.deepcopy(BASE)
    # Written into the file (YAML escapes it): an environment variable cannot hold a NUL.
    doc["destinations"]["planhat"]["tenant_token"] = halves[0] + inside + halves[1]
    line = _one_line_exit_2(capsys, write_config(tmp_path / "config.yaml", doc))
    assert line.startswith("audience-sync: error: destinations.planhat.tenant_token: "
                           "contains the control character U+")
    assert not any(half in line for half in halves)


def test_blank_secret_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PH_TOKEN", " \n")
    line = _one_line_exit_2(capsys, write_config(tmp_path / "config.yaml", BASE))
    assert line.endswith("destinations.planhat.tenant_token: is empty")


def test_file_mounted_token_ending_in_newline_delivers(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    monkeypatch.setenv("PLANHAT_TENANT_TOKEN", TENANT_TOKEN + "\n")
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY + "\r\n")
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as planhat, \
            FakeSegment(WRITE_KEY).running() as segment:
        config = delivery_config(tmp_path, state_url, planhat=planhat.url,
                                 segment=segment.url, trait=False)
        code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert "-> planhat: 3 sent, 0 failed" in out and "-> segment: 3 sent, 0 failed" in out
    assert planhat.statuses[401] == 0 and segment.statuses[401] == 0
    assert TENANT_TOKEN not in out + err and WRITE_KEY not in out + err


# -- YAML -----------------------------------------------------------------------------------------

# The 371-byte kind of "billion laughs": nine levels of nine aliases, 9**9 strings expanded.
ALIAS_BOMB = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi",
                                                                 strict=True)]) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "config.yaml", ALIAS_BOMB)
    started = time.monotonic()
    line = _one_line_exit_2(capsys, path)
    assert time.monotonic() - started < 5
    assert "aliases expand the document by more than 100000 nodes" in line


def test_yaml_recursive_alias_is_refused(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path / "config.yaml", "audiences: &a [*a]\n")
    line = _one_line_exit_2(capsys, path)
    assert "an alias refers to the node that contains it at line 1" in line


def test_yaml_anchors_and_merge_keys_within_the_bound_still_work(tmp_path: Path) -> None:
    # An audience's schedule merged from another's, the ordinary YAML way.
    doc = copy.deepcopy(BASE)
    doc["audiences"][0]["schedule"] = {"every": "6h"}
    body = yaml.safe_dump(doc, sort_keys=False)
    body = body.replace("schedule:\n    every: 6h\n", "schedule: &slow\n    every: 6h\n", 1)
    body = body.replace("schedule:\n    every: 3h\n", "schedule:\n    <<: *slow\n    jitter: 1m\n")
    assert "*slow" in body
    config = load_config(write_config(tmp_path / "config.yaml", body), env=ENV)
    high = config.find("high_value")
    assert (high.every, high.jitter) == (timedelta(hours=6), timedelta(minutes=1))


@pytest.mark.parametrize(("text", "expected"), [
    ("audiences: []\nstate_db: sqlite:///x.db\naudiences: []\n",
     "duplicate key 'audiences' (first on line 1) at line 3, column 1"),
    ("sources:\n  warehouse: {url: 'sqlite:///a.db'}\n  warehouse: {url: 'sqlite:///b.db'}\n",
     "duplicate key 'warehouse' (first on line 2) at line 3, column 3"),
    ("audiences:\n  - name: A\n    source: w\n    name: B\n",
     "duplicate key 'name' (first on line 2) at line 4, column 5"),
])
def test_yaml_duplicate_keys_are_refused_naming_key_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    line = _one_line_exit_2(capsys, write_config(tmp_path / "config.yaml", text))
    assert line.endswith(expected)


def test_non_utf8_config_is_one_line_exit_2(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"state_db: sqlite:///state.db\n# caf\xe9 in Latin-1\n")
    line = _one_line_exit_2(capsys, path)
    assert line.endswith("config.yaml: not UTF-8 text (byte 0xe9 on line 2)")


def test_utf8_byte_order_mark_is_not_part_of_the_first_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump(BASE).encode())
    assert load_config(path, env=ENV).state_db.endswith("state.db")


# -- command-line times ---------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "option"), [("members", "--at"), ("history", "--since")])
@pytest.mark.parametrize("when", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"])
def test_time_outside_utc_range_is_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        command: str, option: str, when: str) -> None:
    monkeypatch.setenv("PH_TOKEN", ENV["PH_TOKEN"])
    path = write_config(tmp_path / "config.yaml", BASE)
    line = _one_line_exit_2(capsys, path, command, "high_value", option, when)
    assert line == (f"audience-sync: error: {option}: {when!r} is outside the years 1 to 9999 "
                    "in UTC")


@pytest.mark.parametrize("when", ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z",
                                  "9999-12-31T23:59:59+05:00"])
def test_extreme_times_inside_utc_range_are_answered(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    monkeypatch.setenv("PH_TOKEN", ENV["PH_TOKEN"])
    path = write_config(tmp_path / "config.yaml", {**BASE, "state_db": state_url})
    for command, option in (("members", "--at"), ("history", "--since")):
        code, out, err = cli(capsys, "--config", str(path), command, "high_value", option, when,
                             "--json")
        assert code == 0, err
        assert json.loads(out) == []


# -- URLs shown to people -------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "masked"), [
    ("http://user:pw@host/path?key=secret", "http://***@host/path?key=***"),
    ("http://proxy:p%40ss%2Bw@10.0.0.1:3128/?key=a&sig=b&flag",
     "http://***@10.0.0.1:3128/?key=***&sig=***&***"),
    ("https://WRITEKEY@api.segment.io", "https://***@api.segment.io"),
    ("https://WRITEKEY:@api.segment.io/v1", "https://***@api.segment.io/v1"),
    ("postgresql+psycopg://app:pa/ss@db:5432/state?sslpassword=x",
     "postgresql+psycopg://***@db:5432/state?sslpassword=***"),
    ("https://api.planhat.com", "https://api.planhat.com"),
    ("https://h/p?empty=&x=1#access_token=t", "https://h/p?empty=&x=***#***"),
    ("sqlite:////tmp/state.db", "sqlite:////tmp/state.db"),
])
def test_mask_url_hides_userinfo_and_query_values(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_mask_urls_in_text() -> None:
    text = "cannot reach http://u:pw@h:1/?key=k1: refused; see 'https://x/?t=k2'"
    assert mask_urls_in(text) == ("cannot reach http://***@h:1/?key=***: refused; "
                                  "see 'https://x/?t=***'")


def test_check_masks_userinfo_and_query_of_base_url(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as planhat, \
            FakeSegment(WRITE_KEY).running() as segment:
        host = planhat.url.removeprefix("http://")
        config = delivery_config(
            tmp_path, f"sqlite:///{tmp_path / 'state.db'}",
            planhat=f"http://proxyuser:proxy-PASSWORD-1@{host}/?key=query-SECRET-2",
            segment=segment.url + "/?api_key=query-SECRET-3", trait=False)
        _, out, err = cli(capsys, "--config", str(config), "check")
    assert "destinations.planhat: " in out and "destinations.segment: " in out
    for secret in ("proxy-PASSWORD-1", "query-SECRET-2", "query-SECRET-3"):
        assert secret not in out + err
    assert f"http://***@{host}/?key=***" in out


def test_store_repr_masks_password_and_query_of_database_url() -> None:
    store = Store("postgresql+psycopg://app:db-PASSWORD-1@127.0.0.1:1/state"
                  "?sslpassword=db-SECRET-2")
    try:
        shown = repr(store)
    finally:
        store.dispose()
    assert shown == "Store('postgresql+psycopg://***@127.0.0.1:1/state?sslpassword=***')"
