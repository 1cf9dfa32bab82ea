"""What Engage sends: identify and track calls per destination (`send:`), renamed events, the
personas context, and Segment's reading of every audience message; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_sync.config import PlanhatConfig, SegmentConfig, load_config
from audience_sync.destinations.planhat import ACTIVITY_BULK_MAX, PlanhatApiDestination
from audience_sync.destinations.segment import SegmentDestination
from audience_sync.messages import Delivery, Style, message_id
from tests.delivery_setup import (
    API_TOKEN,
    TENANT_TOKEN,
    USERS,
    WRITE_KEY,
    delivery_config,
    set_env,
)
from tests.fakes import FakePlanhat, FakeSegment
from tests.helpers import cli, set_users, write_config
from tests.membership_rule import is_membership
from tests.test_e2e_delivery_kill import _kill_mid_drain_then_restart

BOTH = {"send": ["identify", "track"]}
RENAMED = {"entered": "Joined Segment", "exited": "Left Segment", "trait": "Score Changed"}


def _value(m: dict[str, Any]) -> Any:
    key = m["context"]["personas"]["computation_key"]
    return (m["traits"] if m["type"] == "identify" else m["properties"])[key]


def _calls(messages: list[dict[str, Any]]) -> list[tuple[str, str, str, Any]]:
    """(user, computation key, type or event, value), sorted."""
    return sorted((m["userId"], m["context"]["personas"]["computation_key"],
                   m.get("event", m["type"]), _value(m)) for m in messages)


def test_send_identify_and_track_yields_one_of_each_per_change(
        tmp_path: Path, state_url: str, planhat: FakePlanhat, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, segment=segment.url,
                             overrides={"planhat": BOTH,
                                        "segment": {**BOTH, "events": RENAMED}})
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    report = json.loads(out)["deliveries"]
    # 3 members + 4 trait values, each as an identify and as a track.
    assert report["planhat"]["sent"] == report["segment"]["sent"] == 14

    # Planhat (Segment mode): track calls go to /dock/segment too, Engage's names.
    tracks = [m for m in planhat.messages if m["type"] == "track"]
    ann = next(m for m in tracks if m["userId"] == "u1" and "audience_key" in m["properties"])
    assert ann["event"] == "Audience Entered" and ann["user_id"] == "u1"
    assert ann["properties"] == {"audience_key": "power_users", "power_users": True}
    assert ann["context"]["traits"] == {"email": "ann@example.com", "name": "Ann",
                                        "title": "CTO", "companyId": "c1"}
    assert ann["context"]["personas"]["computation_class"] == "audience"
    score = next(m for m in tracks if m["userId"] == "u4")
    assert score["event"] == "Trait Computed"
    assert score["properties"] == {"trait_key": "score", "score": 1.0}
    ident = next(m for m in planhat.messages if m["type"] == "identify"
                 and m["userId"] == "u1" and "power_users" in m["traits"])
    # Each its own deterministic messageId; the identify's is what it always was.
    run_id = 1
    assert ident["messageId"] == message_id("power_users", "u1", run_id, "true")
    assert ann["messageId"] == message_id("power_users", "u1", run_id, "true", "track")
    assert ann["messageId"] != ident["messageId"]

    # Segment: renamed events; one identify and one track per change.
    seg = _calls(segment.messages)
    assert Counter(call for _, _, call, _ in seg) == {"identify": 7, "Joined Segment": 3,
                                                      "Score Changed": 4}
    assert segment.messages[0]["messageId"] in {m["messageId"] for m in planhat.messages}

    # Second sync: u1 leaves (5.0), u4 enters (30.0), u2's email alone changes.
    users = [list(u) for u in USERS]
    users[0][5], users[3][5] = 5.0, 30.0
    users[1][1] = "bob@new.example.com"
    set_users(tmp_path / "warehouse.db", [tuple(u) for u in users])
    before_ph, before_seg = len(planhat.messages), len(segment.messages)
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert _calls(planhat.messages[before_ph:]) == [
        ("u1", "power_users", "Audience Exited", False),
        ("u1", "power_users", "identify", False),
        ("u1", "score", "Trait Computed", 5.0),
        ("u1", "score", "identify", 5.0),
        # A changed email (the trait query's) is an identify, never an event.
        ("u2", "score", "identify", 20.0),
        ("u4", "power_users", "Audience Entered", True),
        ("u4", "power_users", "identify", True),
        ("u4", "score", "Trait Computed", 30.0),
        ("u4", "score", "identify", 30.0),
    ]
    assert [e for _, _, e, _ in _calls(segment.messages[before_seg:])
            if e != "identify"] == ["Left Segment", "Score Changed", "Joined Segment",
                                    "Score Changed"]
    assert not planhat.duplicates() and not segment.duplicates()


def test_crash_between_identify_and_track_resends_only_the_track(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One claim per call (batch_size 1): killed once the three identifies and one track were
    acknowledged, the restart sends the two other tracks and nothing twice."""
    set_env(monkeypatch)
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as fake:
        assert isinstance(fake, FakePlanhat)
        config = delivery_config(tmp_path, state_url, planhat=fake.url, trait=False,
                                 overrides={"planhat": {**BOTH, "batch_size": 1,
                                                        "concurrency": 1}})
        assert _kill_mid_drain_then_restart(fake, config, state_url, capsys, 4) == 4
    assert fake.duplicates() == {}
    assert Counter(m["type"] for m in fake.messages) == {"identify": 3, "track": 3}
    assert [m["type"] for m in fake.messages[:4]] == ["identify"] * 3 + ["track"]
    assert {m["userId"] for m in fake.messages if m["type"] == "track"} == {"u1", "u2", "u3"}


def test_every_audience_message_reads_right_by_segments_membership_rule(
        tmp_path: Path, state_url: str, planhat: FakePlanhat, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    jsonl = tmp_path / "out.jsonl"
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, segment=segment.url,
                             overrides={"planhat": BOTH, "segment": {**BOTH,
                                                                     "events": RENAMED}})
    document = yaml.safe_load(config.read_text())
    document["destinations"]["file"] = {"type": "jsonl", "path": str(jsonl), **BOTH}
    document["audiences"][0]["destinations"].append("file")
    document["space"] = "spc_demo"
    write_config(config, document)
    code, _, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    users = [list(u) for u in USERS]
    users[0][5], users[3][5] = 5.0, 30.0
    set_users(tmp_path / "warehouse.db", [tuple(u) for u in users])
    code, _out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err

    file_messages = [json.loads(line) for line in jsonl.read_text().splitlines()]
    everything = planhat.messages + segment.messages + file_messages
    audience = [m for m in everything if m["context"]["personas"]["computation_key"]
                == "power_users"]
    # 3 entries, then an exit and an entry; identify and track; three destinations.
    assert len(audience) == 5 * 2 * 3
    for m in audience:
        expected = not (m["userId"] == "u1" and m["timestamp"] != audience[0]["timestamp"])
        assert is_membership(m) is expected, m
        persona = m["context"]["personas"]
        assert persona["space_id"] == "spc_demo" and persona["namespace"] == "spa_spc_demo"
        assert persona["computation_id"] == "aud_power_users"
    # A trait message is never read as membership.
    traits = [m for m in everything if m["context"]["personas"]["computation_class"] == "trait"]
    assert traits and all(is_membership(m) is None for m in traits)


def test_default_space_id_is_stored_once_and_stable(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, trait=False)
    code, _, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    set_users(tmp_path / "warehouse.db", [*USERS, ("u9", None, None, None, "c1", 99.0)])
    code, _out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    spaces = {m["context"]["personas"]["space_id"] for m in planhat.messages}
    assert len(planhat.messages) == 4 and len(spaces) == 1
    [space] = spaces
    assert len(space) == 20 and space.isalnum()


def test_planhat_api_track_goes_out_as_bulk_activities(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url, trait=False,
                             overrides={"planhat_api": {
                                 **BOTH, "tenant_token": "${PLANHAT_TENANT_TOKEN}",
                                 "analytics_base_url": planhat.url}})
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    assert json.loads(out)["deliveries"]["planhat_api"]["sent"] == 6
    assert planhat.activity_requests == 1  # one bulk request for the three entries
    ann = next(a for a in planhat.activities if a["externalId"] == "u1")
    assert ann["action"] == "Audience Entered" and ann["companyExternalId"] == "c1"
    assert ann["info"] == {"audience_key": "power_users", "power_users": True}
    assert ann["email"] == "ann@example.com" and ann["date"].endswith("Z")
    assert {u: v["custom"] for u, v in planhat.endusers.items()} == {
        "u1": {"power_users": True}, "u2": {"power_users": True}, "u3": {"power_users": True}}
    users = [list(u) for u in USERS]
    users[0][5] = 5.0
    set_users(tmp_path / "warehouse.db", [tuple(u) for u in users])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert planhat.activity_requests == 2
    assert [(a["externalId"], a["action"]) for a in planhat.activities[3:]] == [
        ("u1", "Audience Exited")]
    assert not planhat.duplicates()
    code, out, err = cli(capsys, "--config", str(config), "status", "--json")
    assert all(not item["pending"] for item in json.loads(out)["computations"])
    assert TENANT_TOKEN not in out + err


CALL_MIX = ("identify", "track", "identify", "group", "track")


def _mixed(count: int, name: str) -> list[Delivery]:
    """Identify, track and (an account's) group rows in turn, for audience and trait, entries
    and exits; half the group calls name a user, the others go with the account as
    anonymousId."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        kind, key = ("audience", "aud") if i % 4 < 2 else ("trait", "score")
        value = ("true" if i % 3 else "false") if kind == "audience" else str(i)
        call = CALL_MIX[i % len(CALL_MIX)]
        rows.append(Delivery(i + 1, key, kind, 1, "d", f"u{i}", value, f"u{i}@example.com",
                             name, None, "c1", at, 0, call,
                             f"owner{i}" if call == "group" and i % 2 else None))
    return rows


def test_segment_batches_stay_within_limits_whatever_the_mix_of_calls(
        segment: FakeSegment) -> None:
    """Every mix of identify and track (audience and trait) in batches Segment accepts: the
    fake refuses any batch over 500 KB or 2,500 messages and any message over 32 KB."""
    config = SegmentConfig(type="segment", write_key=WRITE_KEY, base_url=segment.url,
                           rate_limit="2000/s", send=["identify", "track"])
    destination = SegmentDestination("segment", config, style=Style(space="s1"))
    try:
        for name, count in (("x" * 30_000, 40), ("Ann", 6_000), ("y" * 400, 3_000)):
            before = len(segment.messages)
            outcomes = destination.send(_mixed(count, name))
            assert all(o.ok for o in outcomes) and len(outcomes) == count
            assert len(segment.messages) - before == count
    finally:
        destination.close()
    assert set(segment.statuses) == {200} and segment.batches >= 3 + 2 + 3
    sent = [d for count, name in ((40, "x"), (6_000, "Ann"), (3_000, "y"))
            for d in _mixed(count, name)]
    assert Counter(m["type"] for m in segment.messages) == Counter(d.call for d in sent)
    groups = [m for m in segment.messages if m["type"] == "group"]
    assert groups and all(("userId" in m) != ("anonymousId" in m) for m in groups)
    assert {m.get("anonymousId") for m in groups} - {None} <= {f"u{i}" for i in range(6_000)}


def test_planhat_activities_batched_within_the_bulk_limit_and_acknowledged(
        planhat: FakePlanhat) -> None:
    config = PlanhatConfig(type="planhat", mode="api", api_token=API_TOKEN,
                           tenant_token=TENANT_TOKEN, base_url=planhat.url,
                           analytics_base_url=planhat.url, rate_limit="2000/s",
                           send=["identify", "track"])
    destination = PlanhatApiDestination("planhat", config)
    tracks = [d for d in _mixed(15_000, "Ann") if d.call == "track"]
    assert len(tracks) == ACTIVITY_BULK_MAX + 1_000
    try:
        outcomes = destination.send(tracks)
    finally:
        destination.close()
    assert sorted(o.delivery_id for o in outcomes if o.ok) == [d.id for d in tracks]
    # 6,000 activities: two requests, each within the fake's 5,000.
    assert planhat.activity_requests == 2 and len(planhat.activities) == len(tracks)
    assert planhat.bulk_requests == []  # no end-user upsert for track rows


@pytest.mark.parametrize(("setting", "message"), [
    ({"send": ["identify", "identify"]}, "lists a call twice"),
    ({"send": ["page"]}, "send[0]"),
    ({"send": []}, "send"),
    ({"events": {"entered": ""}}, "events.entered"),
    ({"mode": "api", "api_token": "${PLANHAT_API_TOKEN}", "tenant_token": None,
      "send": ["track"]}, "tenant_token is required in mode api with send: track"),
])
def test_send_and_events_settings_are_validated_with_one_clear_line(
        tmp_path: Path, setting: dict[str, Any], message: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, f"sqlite:///{tmp_path}/s.db", planhat="http://x.test",
                             trait=False)
    document = yaml.safe_load(config.read_text())
    document["destinations"]["planhat"].update(setting)
    document["destinations"]["planhat"] = {k: v for k, v in
                                           document["destinations"]["planhat"].items()
                                           if v is not None}
    write_config(config, document)
    code, _, err = cli(capsys, "--config", str(config), "status")
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_send_is_kept_in_call_order_and_space_must_be_an_id(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, f"sqlite:///{tmp_path}/s.db", planhat="http://x.test",
                             trait=False, overrides={"planhat": {"send": ["track", "identify"]}})
    assert load_config(config).computations[0].outbox_calls == (
        ("planhat", "identify"), ("planhat", "track"))
    document = yaml.safe_load(config.read_text())
    document["space"] = "not an id"
    write_config(config, document)
    code, _, err = cli(capsys, "--config", str(config), "status")
    assert code == 2 and "space" in err


def _pending_calls(state_url: str) -> Counter[tuple[str, str]]:
    """(user, call) of the pending deliveries."""
    from sqlalchemy import create_engine, select

    from audience_sync.state import schema as t

    engine = create_engine(state_url)
    try:
        with engine.connect() as conn:
            d = t.deliveries
            return Counter(conn.execute(select(d.c.user_id, d.c.call).where(
                d.c.status == "pending")).tuples())
    finally:
        engine.dispose()


def test_a_pending_track_is_never_superseded_by_a_change_that_sends_no_track(
        tmp_path: Path, state_url: str) -> None:
    """A resync sends every member's identify again but no event, and a trait's changed email
    alone is an identify: neither may supersede an entry or a value whose track has not gone
    out yet (it was lost)."""
    from audience_sync.runner import run_computation
    from audience_sync.state.store import Store
    from tests.helpers import make_warehouse

    make_warehouse(tmp_path / "w.db", [("u1", "a@x.com", None, None, None, 50.0),
                                       ("u2", "b@x.com", None, None, None, 5.0)])
    config = load_config(write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'w.db'}"}},
        "destinations": {"file": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"),
                                  **BOTH}},
        "audiences": [{"name": "Big", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id, email FROM users WHERE score > 10"}],
        "computed_traits": [{"name": "Score", "source": "w", "destinations": ["file"],
                             "query": "SELECT id AS user_id, email, score AS value "
                                      "FROM users"}]}))
    store = Store(state_url)
    store.upgrade()
    store.register(config.computations, datetime.now(UTC))
    big, score = config.computations
    try:
        # Nothing is drained: every call of the first runs stays pending.
        assert run_computation(store, config, big).ok and run_computation(store, config, score).ok
        assert _pending_calls(state_url) == Counter({
            ("u1", "identify"): 2, ("u1", "track"): 2, ("u2", "identify"): 1,
            ("u2", "track"): 1})
        assert run_computation(store, config, big, resync=True).ok
        set_users(tmp_path / "w.db", [("u1", "new@x.com", None, None, None, 50.0),
                                      ("u2", "b@x.com", None, None, None, 5.0)])
        assert run_computation(store, config, score).ok
        # The identifies were replaced by newer ones; the tracks are still there to send.
        assert _pending_calls(state_url) == Counter({
            ("u1", "identify"): 2, ("u1", "track"): 2, ("u2", "identify"): 1,
            ("u2", "track"): 1})
    finally:
        store.dispose()
