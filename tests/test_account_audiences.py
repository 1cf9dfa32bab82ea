"""Account-level audiences and traits (`level: account`): group calls for changed accounts
only, the fan-out to the users of `account_users:` (a user moving between accounts included),
the removal guard on the fan-out, and the history of accounts; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_sync.config import load_config
from audience_sync.errors import ConfigError
from audience_sync.messages import message_id
from tests.delivery_setup import API_TOKEN, FAST, TENANT_TOKEN, set_env
from tests.fakes import FakePlanhat, FakeSegment
from tests.helpers import cli, write_config
from tests.membership_rule import is_membership
from tests.ui_setup import UIProject, request, serving

ACCOUNTS = [("a1", "Acme", 20, "u1"), ("a2", "Beta", 12, "u3"), ("a3", "Corp", 5, "u5")]
MEMBERSHIPS = [("u1", "a1"), ("u2", "a1"), ("u3", "a2"), ("u4", "a2"), ("u5", "a3"),
               ("u6", "a1"), ("u6", "a3")]
# Second state: Beta shrinks out, Corp grows in; u2 moves Acme -> Corp and u4 Beta -> Acme
# (both stay in: nothing sent), u7 joins Acme, u1 leaves every account.
ACCOUNTS_2 = [("a1", "Acme", 20, "u1"), ("a2", "Beta", 3, "u3"), ("a3", "Corp", 15, "u5")]
MEMBERSHIPS_2 = [("u2", "a3"), ("u3", "a2"), ("u4", "a1"), ("u5", "a3"), ("u6", "a1"),
                 ("u6", "a3"), ("u7", "a1")]

AUDIENCE = "SELECT id AS group_id, name, owner AS user_id FROM accounts WHERE seats >= 10"
TRAIT = "SELECT id AS group_id, seats AS value FROM accounts"


def _warehouse(path: Path, accounts: Sequence[tuple[Any, ...]],
               memberships: Sequence[tuple[str, str]]) -> None:
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE IF NOT EXISTS accounts (id TEXT, name TEXT, seats INTEGER, owner TEXT);
        CREATE TABLE IF NOT EXISTS memberships (user_id TEXT, account_id TEXT);
        DELETE FROM accounts; DELETE FROM memberships;
    """)
    db.executemany("INSERT INTO accounts VALUES (?, ?, ?, ?)", accounts)
    db.executemany("INSERT INTO memberships VALUES (?, ?)", memberships)
    db.commit()
    db.close()


def _config(tmp_path: Path, state_url: str, segment_url: str, **extra: Any) -> Path:
    warehouse = tmp_path / "warehouse.db"
    if not warehouse.exists():
        _warehouse(warehouse, ACCOUNTS, MEMBERSHIPS)
    document: dict[str, Any] = {
        "state_db": state_url,
        "sources": {"warehouse": {
            "url": f"sqlite:///{warehouse}",
            "account_users": "SELECT user_id, account_id AS group_id FROM memberships"}},
        "destinations": {
            "segment": {"type": "segment", "write_key": "${SEGMENT_WRITE_KEY}",
                        "base_url": segment_url, "rate_limit": "2000/s", **FAST},
            "users": {"type": "jsonl", "path": str(tmp_path / "users.jsonl"),
                      "accounts": "identify"},
            "events": {"type": "jsonl", "path": str(tmp_path / "events.jsonl"),
                       "accounts": "track"},
        },
        "audiences": [{"name": "Big Accounts", "level": "account", "source": "warehouse",
                       "query": AUDIENCE, "destinations": ["segment", "users", "events"]}],
        "computed_traits": [{"name": "Seats", "level": "account", "source": "warehouse",
                             "query": TRAIT, "destinations": ["segment", "users"]}],
        **extra,
    }
    return write_config(tmp_path / "config.yaml", document)


def _lines(path: Path, start: int = 0) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()[start:]]


def _key(m: dict[str, Any]) -> str:
    return str(m["context"]["personas"]["computation_key"])


def _value(m: dict[str, Any]) -> Any:
    return (m["properties"] if m["type"] == "track" else m["traits"])[_key(m)]


def _by_user(messages: list[dict[str, Any]], key: str) -> dict[str, Any]:
    found = [m for m in messages if _key(m) == key]
    by_user = {m["userId"]: _value(m) for m in found}
    assert len(by_user) == len(found), "a user was sent twice"
    return by_user


def test_group_calls_for_changed_accounts_and_fan_out_with_moving_users(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = _config(tmp_path, state_url, segment.url)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    runs = {r["key"]: r for r in json.loads(out)["runs"]}
    assert runs["big_accounts"]["members"] == 2
    assert runs["big_accounts"]["fan_out"] == {"users": 5, "entered": 5, "exited": 0,
                                               "changed": 0}

    # Segment: one group call per member account, named by the account's owner.
    groups = [m for m in segment.messages if m["type"] == "group"]
    big = sorted((m for m in groups if _key(m) == "big_accounts"), key=lambda m: m["groupId"])
    assert [(m["groupId"], m["userId"], m["traits"]) for m in big] == [
        ("a1", "u1", {"name": "Acme", "big_accounts": True}),
        ("a2", "u3", {"name": "Beta", "big_accounts": True})]
    assert all(is_membership(m) is True for m in big)
    assert big[0]["messageId"] == message_id("big_accounts", "a1", 1, "true", "group")
    assert {m["groupId"]: m["traits"]["seats"] for m in groups if _key(m) == "seats"} == {
        "a1": 20, "a2": 12, "a3": 5}
    assert all(m["type"] == "group" for m in segment.messages)

    # Fan-out: every user of a member account, once (u6 is in Acme and Corp).
    users = _lines(tmp_path / "users.jsonl")
    assert all(m["type"] == "identify" for m in users)
    assert _by_user(users, "big_accounts") == {u: True for u in ("u1", "u2", "u3", "u4", "u6")}
    u6 = next(m for m in users if m["userId"] == "u6" and _key(m) == "big_accounts")
    assert u6["traits"] == {"company_id": "a1", "big_accounts": True}
    assert _by_user(users, "seats") == {"u1": 20, "u2": 20, "u6": 20, "u3": 12, "u4": 12,
                                        "u5": 5}
    events = _lines(tmp_path / "events.jsonl")
    assert {m["userId"]: m["event"] for m in events} == {
        u: "Audience Entered" for u in ("u1", "u2", "u3", "u4", "u6")}
    assert all(is_membership(m) is True for m in users + events if _key(m) == "big_accounts")

    # The second state: only the accounts that changed get a group call; users get the
    # value their accounts now give them.
    _warehouse(tmp_path / "warehouse.db", ACCOUNTS_2, MEMBERSHIPS_2)
    seen_segment, seen_users, seen_events = len(segment.messages), len(users), len(events)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    runs = {r["key"]: r for r in json.loads(out)["runs"]}
    assert runs["big_accounts"]["fan_out"] == {"users": 5, "entered": 2, "exited": 2,
                                               "changed": 0}
    groups = segment.messages[seen_segment:]
    assert sorted((m["groupId"], _value(m)) for m in groups if _key(m) == "big_accounts") == [
        ("a2", False), ("a3", True)]
    assert sorted((m["groupId"], _value(m)) for m in groups if _key(m) == "seats") == [
        ("a2", 3), ("a3", 15)]
    users = _lines(tmp_path / "users.jsonl", seen_users)
    # u5 and u7 came in with Corp and Acme; u1 left every account, u3 stayed with Beta.
    # u2 (Acme -> Corp) and u4 (Beta -> Acme) stayed in the audience: nothing sent.
    assert _by_user(users, "big_accounts") == {"u5": True, "u7": True, "u1": False,
                                               "u3": False}
    # A trait's user takes their account's value: u2 and u4 moved, u3's and u5's changed.
    assert _by_user(users, "seats") == {"u1": None, "u2": 15, "u3": 3, "u4": 20, "u5": 15,
                                        "u7": 20}
    events = _lines(tmp_path / "events.jsonl", seen_events)
    assert sorted((m["userId"], m["event"]) for m in events) == [
        ("u1", "Audience Exited"), ("u3", "Audience Exited"), ("u5", "Audience Entered"),
        ("u7", "Audience Entered")]
    assert all(is_membership(m) is (m["event"] == "Audience Entered") for m in events)

    # A third sync with nothing changed sends nothing.
    seen_segment = len(segment.messages)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    assert len(segment.messages) == seen_segment
    assert len(_lines(tmp_path / "users.jsonl")) == seen_users + len(users)
    assert not segment.duplicates()

    # The audience's members and history are accounts.
    code, out, err = cli(capsys, "--config", str(config), "members", "big_accounts", "--json")
    assert code == 0, err
    assert sorted(m["user_id"] for m in json.loads(out)) == ["a1", "a3"]
    code, out, err = cli(capsys, "--config", str(config), "history", "big_accounts", "--json")
    assert code == 0, err
    assert sorted((h["user_id"], h["change"]) for h in json.loads(out)) == [
        ("a1", "entered"), ("a2", "entered"), ("a2", "exited"), ("a3", "entered")]
    code, out, err = cli(capsys, "--config", str(config), "runs", "big_accounts", "--json")
    assert code == 0, err
    runs_doc = sorted(json.loads(out), key=lambda r: r["run_id"])
    assert [(r["members"], r["entered"], r["exited"]) for r in runs_doc] == [
        (2, 2, 0), (2, 1, 1), (2, 0, 0)]
    # The fan-out's figures are in the run record too.
    assert [r["fan_out"] for r in runs_doc] == [
        {"users": 5, "entered": 5, "exited": 0, "changed": 0},
        {"users": 5, "entered": 2, "exited": 2, "changed": 0},
        {"users": 5, "entered": 0, "exited": 0, "changed": 0}]
    code, out, err = cli(capsys, "--config", str(config), "members", "big_accounts",
                         "--at", runs_doc[0]["clock"], "--json")
    assert code == 0, err
    assert sorted(m["user_id"] for m in json.loads(out)) == ["a1", "a2"]
    code, out, err = cli(capsys, "--config", str(config), "status", "--json")
    assert code == 0, err
    status = {c["key"]: c for c in json.loads(out)["computations"]}
    assert (status["big_accounts"]["level"], status["big_accounts"]["members"]) == ("account", 2)
    code, out, err = cli(capsys, "--config", str(config), "status")
    assert "big_accounts  audience, 2 accounts," in out

    # The dashboard says accounts, and an account's timeline is its stays.
    with serving(UIProject(config, tmp_path / "warehouse.db", state_url)) as base:
        status_code, index, _ = request(base + "/")
        assert status_code == 200
        row = re.search(r'<tr data-key="big_accounts">(.*?)</tr>', index, re.S)
        assert row is not None and "account audience" in row.group(1)
        status_code, page, _ = request(base + "/audiences/big_accounts")
        assert status_code == 200
        assert "<small>Accounts</small><b id=\"members\">2</b>" in page
        assert "Account id" in page
        assert page.count('<small class="fan-out">5 users (+2 -2)</small>') == 1
        status_code, timeline, _ = request(base + "/audiences/big_accounts/users/a2")
        assert status_code == 200
        changes = re.search(r'<ol id="timeline".*?</ol>', timeline, re.S)
        assert changes is not None
        assert re.findall(r'class="change-(\w+)"', changes.group(0)) == ["entered", "exited"]


def test_a_resync_sends_every_account_and_every_fanned_out_user_again(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = _config(tmp_path, state_url, segment.url)
    assert cli(capsys, "--config", str(config), "sync")[0] == 0
    seen_segment = len(segment.messages)
    seen_users = len(_lines(tmp_path / "users.jsonl"))
    seen_events = len(_lines(tmp_path / "events.jsonl"))
    code, _, err = cli(capsys, "--config", str(config), "resync", "big_accounts")
    assert code == 0, err
    assert sorted(m["groupId"] for m in segment.messages[seen_segment:]) == ["a1", "a2"]
    assert _by_user(_lines(tmp_path / "users.jsonl", seen_users), "big_accounts") == {
        u: True for u in ("u1", "u2", "u3", "u4", "u6")}
    # Track calls are events: a resync's unchanged users are not sent one again.
    assert _lines(tmp_path / "events.jsonl", seen_events) == []


def test_an_emptied_account_users_query_is_held_not_sent_as_exits(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = _config(tmp_path, state_url, segment.url)
    assert cli(capsys, "--config", str(config), "sync")[0] == 0
    seen = len(_lines(tmp_path / "users.jsonl"))
    _warehouse(tmp_path / "warehouse.db", ACCOUNTS, [])
    code, _, err = cli(capsys, "--config", str(config), "sync", "big_accounts")
    assert code == 3, err
    assert "would remove 5 of the 5 users its accounts were fanned out to" in err
    assert len(_lines(tmp_path / "users.jsonl")) == seen
    code, out, err = cli(capsys, "--config", str(config), "runs", "big_accounts", "--json")
    held = json.loads(out)[0]
    assert (held["status"], held["fan_out"]) == ("held", {"users": 0, "entered": 0,
                                                          "exited": 5, "changed": 0})
    # Forced, the exits go out.
    code, _, err = cli(capsys, "--config", str(config), "sync", "big_accounts", "--force")
    assert code == 0, err
    assert _by_user(_lines(tmp_path / "users.jsonl", seen), "big_accounts") == {
        u: False for u in ("u1", "u2", "u3", "u4", "u6")}


def test_a_failing_account_users_query_fails_the_run_and_changes_nothing(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = _config(tmp_path, state_url, segment.url)
    db = sqlite3.connect(tmp_path / "warehouse.db")
    db.execute("ALTER TABLE memberships RENAME TO gone")
    db.commit()
    db.close()
    code, _, err = cli(capsys, "--config", str(config), "sync", "big_accounts")
    assert code == 1
    assert "account_users query failed" in err and "Traceback" not in err
    assert segment.messages == [] and _lines(tmp_path / "users.jsonl") == []


def test_dry_run_counts_the_fanned_out_calls_per_destination(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = _config(tmp_path, state_url, segment.url)
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(config), "sync", "big_accounts",
                         "--dry-run", "--json")
    assert code == 0, err
    run = json.loads(out)["runs"][0]
    assert run["per_destination"] == {"segment": 2, "users": 5, "events": 5}
    assert segment.messages == []


@pytest.mark.parametrize(("destination", "problem"), [
    ({"type": "planhat", "tenant_token": "t", "accounts": "group"},
     "Planhat ignores group calls"),
    ({"type": "planhat", "tenant_token": "t", "accounts": "companies"},
     "accounts: companies needs mode api"),
    ({"type": "jsonl", "path": "x.jsonl", "accounts": "companies"},
     "accounts: companies is for type planhat in mode api"),
    ({"type": "jsonl", "path": "x.jsonl", "accounts": "everyone"}, "accounts"),
])
def test_accounts_setting_is_validated_with_one_clear_line(
        tmp_path: Path, destination: dict[str, Any], problem: str) -> None:
    path = write_config(tmp_path / "config.yaml", {
        "sources": {"w": {"url": "sqlite:///w.db"}},
        "destinations": {"d": destination},
        "audiences": [{"name": "A", "source": "w", "query": "SELECT 1 AS user_id",
                       "destinations": ["d"]}]})
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_account_settings_that_cannot_work_are_config_errors(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "sources": {"w": {"url": "sqlite:///w.db"}},
        "destinations": {"f": {"type": "jsonl", "path": "f.jsonl", "accounts": "identify"}}}
    fan_out = {**base, "audiences": [{"name": "A", "level": "account", "source": "w",
                                      "query": "SELECT 1 AS group_id", "destinations": ["f"]}]}
    with pytest.raises(ConfigError, match=r"audiences\[0\]\.destinations\[0\].*account_users"):
        load_config(write_config(tmp_path / "a.yaml", fan_out), env={})
    rule = {**base, "audiences": [{"name": "A", "level": "account", "source": "w",
                                   "rule": {"event": "E", "within": "1d"},
                                   "destinations": ["f"]}]}
    with pytest.raises(ConfigError, match="defined by a query returning group_id"):
        load_config(write_config(tmp_path / "b.yaml", rule), env={})
    referenced = {**base, "sources": {"w": {"url": "sqlite:///w.db",
                                            "account_users": "SELECT 1 AS user_id"}},
                  "audiences": [
                      {"name": "A", "level": "account", "source": "w",
                       "query": "SELECT 1 AS group_id", "destinations": ["f"]},
                      {"name": "B", "source": "w", "where": [{"audience": "a"}],
                       "destinations": ["f"]}]}
    with pytest.raises(ConfigError, match="is an account audience"):
        load_config(write_config(tmp_path / "c.yaml", referenced), env={})
    accounts = load_config(write_config(tmp_path / "d.yaml", {
        **referenced, "audiences": referenced["audiences"][:1]}), env={})
    assert accounts.computations[0].outbox_calls == (("f", "identify"),)
    assert accounts.computations[0].fanned_out


def test_planhat_api_upserts_companies_with_the_key_as_a_company_custom_field(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as planhat:
        assert isinstance(planhat, FakePlanhat)
        planhat.strict_fields = True
        config = _config(tmp_path, state_url, segment.url)
        document = yaml.safe_load(config.read_text())
        document["destinations"]["planhat"] = {
            "type": "planhat", "mode": "api", "api_token": "${PLANHAT_API_TOKEN}",
            "base_url": planhat.url, "rate_limit": "2000/s", **FAST}
        document["audiences"][0]["destinations"] = ["planhat"]
        document["computed_traits"][0].update(
            destinations=["planhat"],
            query="SELECT id AS group_id, name, seats AS value FROM accounts")
        write_config(config, document)
        code, _, err = cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        assert {k: (c["name"], c["custom"]) for k, c in planhat.companies.items()} == {
            "a1": ("Acme", {"big_accounts": True, "seats": 20}),
            "a2": ("Beta", {"big_accounts": True, "seats": 12}),
            "a3": ("Corp", {"seats": 5})}
        assert sorted(planhat.fields_created) == [("Company", "big_accounts", "checkbox"),
                                                  ("Company", "seats", "number")]
        assert planhat.endusers == {}

        _warehouse(tmp_path / "warehouse.db", ACCOUNTS_2, MEMBERSHIPS_2)
        requests = len(planhat.company_requests)
        code, _, err = cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        # Only the changed accounts, in one request; no field created again.
        assert len(planhat.company_requests) == requests + 1
        assert sorted((i["externalId"], i["custom"]) for i in planhat.company_requests[-1]) == [
            ("a2", {"big_accounts": False, "seats": 3}),
            ("a3", {"big_accounts": True, "seats": 15})]
        assert len(planhat.fields_created) == 2


def _replay(path: Path, key: str, field: str) -> tuple[dict[str, Any], list[str]]:
    """The last value each id was sent for `key` in a jsonl file (field: userId or groupId),
    and the ids sent the same value twice in a row (a change sent for no change)."""
    last: dict[str, Any] = {}
    repeated = []
    for m in _lines(path):
        if _key(m) != key:
            continue
        who, value = m[field], _value(m)
        if who in last and last[who] == value:
            repeated.append(who)
        last[who] = value
    return last, repeated


def test_random_account_changes_leave_every_destination_with_the_right_values(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight syncs of random accounts and memberships (users in 0 to 2 accounts, moving
    between them): after each, replaying what each destination received gives, for every id
    ever sent, exactly the membership and value an independent computation expects, and no
    id is sent a value it already had."""
    import random

    set_env(monkeypatch)
    rng = random.Random(20261130)
    accounts = [f"a{i}" for i in range(1, 13)]
    users = [f"u{i}" for i in range(1, 31)]
    config = _config(tmp_path, state_url, segment.url)
    document = yaml.safe_load(config.read_text())
    document["destinations"]["groups"] = {"type": "jsonl", "path": str(tmp_path / "g.jsonl")}
    document["audiences"][0]["destinations"] = ["groups", "users", "events"]
    document["computed_traits"][0]["destinations"] = ["groups", "users"]
    write_config(config, document)
    ever_members: set[str] = set()
    ever_users: set[str] = set()
    for step in range(8):
        seats = {a: rng.choice([3, 5, 12, 20, 40]) for a in accounts}
        memberships = sorted({(u, a) for u in users
                              for a in rng.sample(accounts, rng.choice([0, 1, 1, 2]))})
        _warehouse(tmp_path / "warehouse.db",
                   [(a, a.upper(), seats[a], None) for a in accounts], memberships)
        code, _, err = cli(capsys, "--config", str(config), "sync", "--force")
        assert code == 0, (step, err)

        members = {a for a in accounts if seats[a] >= 10}
        ever_members |= members
        of_user: dict[str, list[str]] = {}
        for u, a in memberships:
            of_user.setdefault(u, []).append(a)
        in_audience = {u for u, mine in of_user.items() if set(mine) & members}
        ever_users |= in_audience
        groups, repeated = _replay(tmp_path / "g.jsonl", "big_accounts", "groupId")
        assert groups == {a: a in members for a in ever_members} and not repeated, step
        identified, repeated = _replay(tmp_path / "users.jsonl", "big_accounts", "userId")
        assert identified == {u: u in in_audience for u in ever_users} and not repeated, step
        events, repeated = _replay(tmp_path / "events.jsonl", "big_accounts", "userId")
        assert events == identified and not repeated, step
        # The trait: every account has a value; a user takes their smallest account's.
        values, repeated = _replay(tmp_path / "users.jsonl", "seats", "userId")
        expected = {u: seats[min(of_user[u])] if u in of_user else None for u in values}
        assert values == expected and set(of_user) <= set(values) and not repeated, step
        group_values, repeated = _replay(tmp_path / "g.jsonl", "seats", "groupId")
        assert group_values == seats and not repeated, step


def test_check_prepares_the_account_users_query_and_the_account_definitions(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = _config(tmp_path, state_url, segment.url)
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 0, out + err
    assert "sources.warehouse.account_users: ok (columns: user_id, group_id)" in out
    assert "audiences[0] (big_accounts): ok (columns: group_id, name, user_id)" in out

    document = yaml.safe_load(config.read_text())
    document["sources"]["warehouse"]["account_users"] = "SELECT user_id FROM memberships"
    document["audiences"][0]["query"] = "SELECT id AS user_id FROM accounts"
    write_config(config, document)
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 1
    assert ("sources.warehouse.account_users: FAILED: account_users must return user_id and "
            "group_id columns (columns: user_id)") in out
    assert "big_accounts): FAILED: the query returned no group_id column" in out


def test_planhat_segment_mode_takes_an_account_audience_user_by_user_by_default(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Planhat ignores group calls at /dock/segment: its default is the identify fan-out,
    each user's company named as Planhat reads it (traits.companyId)."""
    set_env(monkeypatch)
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as planhat:
        assert isinstance(planhat, FakePlanhat)
        config = _config(tmp_path, state_url, segment.url)
        document = yaml.safe_load(config.read_text())
        document["destinations"]["planhat"] = {
            "type": "planhat", "tenant_token": "${PLANHAT_TENANT_TOKEN}",
            "base_url": planhat.url, "rate_limit": "2000/s", **FAST}
        document["audiences"][0]["destinations"] = ["planhat"]
        del document["computed_traits"]
        write_config(config, document)
        code, _, err = cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        assert {m["userId"]: (m["type"], m["user_id"], m["traits"]) for m in planhat.messages} == {
            u: ("identify", u, {"companyId": account, "big_accounts": True})
            for u, account in (("u1", "a1"), ("u2", "a1"), ("u3", "a2"), ("u4", "a2"),
                               ("u6", "a1"))}


def test_a_resync_keeps_the_fanned_out_tracks_still_to_send(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Undrained entries of an account audience, then a resync: the users' identifies and
    the group calls are replaced by the resync's, their tracks (no resync sends one) stay."""
    from collections import Counter
    from datetime import UTC, datetime

    from sqlalchemy import create_engine, select

    from audience_sync.runner import run_computation
    from audience_sync.state import schema as t
    from audience_sync.state.store import Store

    set_env(monkeypatch)
    config = load_config(_config(tmp_path, state_url, segment.url))
    store = Store(state_url)
    store.upgrade()
    store.register(config.computations, datetime.now(UTC))
    engine = create_engine(state_url)

    def pending() -> Counter[tuple[str, str]]:
        d = t.deliveries
        with engine.connect() as conn:
            return Counter(conn.execute(select(d.c.destination, d.c.call).where(
                d.c.status == "pending", d.c.computation_id == 1)).tuples())

    try:
        big = config.computations[0]
        assert run_computation(store, config, big).ok
        first = pending()
        assert first == Counter({("segment", "group"): 2, ("users", "identify"): 5,
                                 ("events", "track"): 5})
        assert run_computation(store, config, big, resync=True).ok
        assert pending() == first
        with engine.connect() as conn:
            d = t.deliveries
            runs = Counter(conn.execute(select(d.c.call, d.c.run_id).where(
                d.c.status == "pending")).tuples())
        assert {run for (call, run) in runs if call == "track"} == {1}
        assert {run for (call, run) in runs if call != "track"} == {2}
    finally:
        engine.dispose()
        store.dispose()


def test_planhat_api_fans_an_account_audience_out_to_end_users_and_activities(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`accounts: identify` in mode api: each user of a member account upserted as an end
    user with the key as an EndUser custom field; `accounts: track`: user activities naming
    the user's company."""
    set_env(monkeypatch)
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as planhat:
        assert isinstance(planhat, FakePlanhat)
        config = _config(tmp_path, state_url, segment.url)
        document = yaml.safe_load(config.read_text())
        api = {"type": "planhat", "mode": "api", "api_token": "${PLANHAT_API_TOKEN}",
               "tenant_token": "${PLANHAT_TENANT_TOKEN}", "base_url": planhat.url,
               "analytics_base_url": planhat.url, "rate_limit": "2000/s", **FAST}
        document["destinations"]["ph_users"] = {**api, "accounts": "identify"}
        document["destinations"]["ph_events"] = {**api, "accounts": "track"}
        document["audiences"][0]["destinations"] = ["ph_users", "ph_events"]
        del document["computed_traits"]
        write_config(config, document)
        code, _, err = cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        members = {"u1": "a1", "u2": "a1", "u3": "a2", "u4": "a2", "u6": "a1"}
        assert {k: (u.get("companyId"), u["custom"]) for k, u in planhat.endusers.items()} == {
            u: (account, {"big_accounts": True}) for u, account in members.items()}
        assert ("EndUser", "big_accounts", "checkbox") in planhat.fields_created
        assert planhat.companies == {}
        assert sorted((a["externalId"], a["companyExternalId"], a["action"])
                      for a in planhat.activities) == sorted(
            (u, account, "Audience Entered") for u, account in members.items())


def test_preview_names_an_account_audiences_columns_as_its_query_does(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = _config(tmp_path, state_url, segment.url)
    code, out, err = cli(capsys, "--config", str(config), "preview", "big_accounts", "--json")
    assert code == 0, err
    document = json.loads(out)
    assert (document["level"], document["count"]) == ("account", 2)
    assert document["sample"] == [{"group_id": "a1", "name": "Acme", "user_id": "u1"},
                                  {"group_id": "a2", "name": "Beta", "user_id": "u3"}]
    code, out, err = cli(capsys, "--config", str(config), "preview", "big_accounts")
    assert code == 0 and out.startswith("big_accounts: 2 accounts (source 'warehouse'")


@pytest.mark.parametrize("source", ["warehouse", "state database"])
def test_an_account_definitions_other_columns_are_account_traits_of_its_group_calls(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        source: str) -> None:
    """Streamed from a source or written by INSERT ... SELECT in the state database, every
    column besides group_id, user_id and value travels in the group call's traits; the users
    of a fan-out get none of them, and a changed account trait alone sends nothing."""
    from sqlalchemy import create_engine

    setup = ("CREATE TABLE accts (id TEXT, name TEXT, seats INTEGER, plan TEXT, since TEXT)",
             "INSERT INTO accts VALUES ('a1', 'Acme', 20, 'pro', '2024-01-02'), "
             "('a2', 'Beta', 3, NULL, NULL)")
    url = f"sqlite:///{tmp_path / 'w.db'}" if source == "warehouse" else state_url

    def execute(statements: tuple[str, ...]) -> None:
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                for statement in statements:
                    conn.exec_driver_sql(statement)
        finally:
            engine.dispose()

    execute(setup)
    config = write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"s": {"url": url,
                          "account_users": "SELECT 'u' || id AS user_id, id AS group_id "
                                           "FROM accts"}},
        "destinations": {"groups": {"type": "jsonl", "path": str(tmp_path / "g.jsonl")},
                         "users": {"type": "jsonl", "path": str(tmp_path / "u.jsonl"),
                                   "accounts": "identify"}},
        "audiences": [{"name": "Paying", "level": "account", "source": "s",
                       "destinations": ["groups", "users"],
                       "query": "SELECT id AS group_id, name, seats, plan AS \"Plan\", since "
                                "FROM accts WHERE seats > 1"}]})
    code, _, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    groups = {m["groupId"]: m["traits"] for m in _lines(tmp_path / "g.jsonl")}
    assert groups == {
        "a1": {"name": "Acme", "seats": 20, "Plan": "pro", "since": "2024-01-02",
               "paying": True},
        "a2": {"name": "Beta", "seats": 3, "Plan": None, "since": None, "paying": True}}
    assert {m["userId"]: m["traits"] for m in _lines(tmp_path / "u.jsonl")} == {
        "ua1": {"company_id": "a1", "paying": True},
        "ua2": {"company_id": "a2", "paying": True}}
    # A changed account trait alone is no membership change; an exit carries the traits the
    # account was last sent with.
    change = ("UPDATE accts SET plan = 'enterprise' WHERE id = 'a1'",
              "UPDATE accts SET seats = 1 WHERE id = 'a2'")
    execute(change)
    code, _, err = cli(capsys, "--config", str(config), "sync", "--force")
    assert code == 0, err
    after = _lines(tmp_path / "g.jsonl")[2:]
    assert [(m["groupId"], m["traits"]) for m in after] == [
        ("a2", {"name": "Beta", "seats": 3, "Plan": None, "since": None, "paying": False})]
