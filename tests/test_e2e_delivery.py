"""End to end: the CLI against fake Planhat (both modes) and Segment, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.delivery_setup import (
    API_TOKEN,
    SECRETS,
    TENANT_TOKEN,
    USERS,
    delivery_config,
    set_env,
)
from tests.fakes import FakePlanhat, FakeSegment, basic
from tests.helpers import cli, set_users

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _by(messages: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {m["userId"]: m for m in messages if key in m["traits"]}


def test_three_syncs_send_everything_then_changes_then_nothing(
        tmp_path: Path, state_url: str, planhat: FakePlanhat, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, planhat_api=planhat.url,
                             segment=segment.url)

    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    report = json.loads(out)["deliveries"]
    assert report["planhat"]["sent"] == 7 and report["segment"]["sent"] == 7
    assert report["planhat_api"]["sent"] == 7 and report["planhat_api"]["failed"] == 0

    # Planhat, Segment mode: one identify per request, field by field.
    audience = _by(planhat.messages, "power_users")
    assert set(audience) == {"u1", "u2", "u3"}
    ann = audience["u1"]
    assert ann["type"] == "identify" and ann["userId"] == ann["user_id"] == "u1"
    assert ann["traits"] == {"email": "ann@example.com", "name": "Ann", "title": "CTO",
                             "companyId": "c1", "power_users": True}
    persona = ann["context"]["personas"]
    space = persona.pop("space_id")
    assert persona == {"computation_class": "audience", "computation_key": "power_users",
                       "computation_id": "aud_power_users", "namespace": f"spa_{space}"}
    assert ann["context"]["library"]["name"] == "audience-sync"
    assert ann["integrations"] == {"All": False, "Planhat": True}
    assert ann["messageId"].startswith("as-") and len(ann["messageId"]) <= 100
    assert ISO_MS.match(ann["timestamp"])
    assert audience["u3"]["traits"] == {"companyId": "c3", "power_users": True}
    # Seven identifies, one bulk upsert, and before it the custom fields: one list, two created.
    assert len(planhat.request_bodies) == 7 + 1 + 3
    assert sorted(planhat.fields_created) == [("EndUser", "power_users", "checkbox"),
                                              ("EndUser", "score", "number")]
    assert set(planhat.auth_headers) == {basic(TENANT_TOKEN), f"Bearer {API_TOKEN}"}
    scores = _by(planhat.messages, "score")
    assert scores["u4"]["traits"]["score"] == 1.0
    assert scores["u4"]["context"]["personas"]["computation_class"] == "trait"

    # Planhat, API mode: one item per user, audience and trait as custom fields.
    assert len(planhat.bulk_requests) == 1
    items = {i["externalId"]: i for i in planhat.bulk_requests[0]}
    assert items["u1"] == {"externalId": "u1", "email": "ann@example.com", "companyId": "c1",
                           "custom": {"power_users": True, "score": 50.0}}
    assert items["u4"] == {"externalId": "u4", "email": "dan@example.com",
                           "custom": {"score": 1.0}}

    # Segment: /v1/batch, identify without Planhat's extras.
    assert segment.batches == 1
    seg = _by(segment.messages, "power_users")
    assert set(seg) == {"u1", "u2", "u3"}
    assert "user_id" not in seg["u1"] and seg["u1"]["integrations"] == {"All": True}
    assert seg["u1"]["messageId"] == ann["messageId"]
    assert seg["u1"]["traits"]["company_id"] == "c1"

    # Second sync: u1 leaves, u4 enters; only those changes, false for the exit.
    users = [list(u) for u in USERS]
    users[0][5], users[3][5] = 5.0, 30.0
    set_users(tmp_path / "warehouse.db", [tuple(u) for u in users])
    before_ph, before_seg, before_bulk = len(planhat.messages), len(segment.messages), \
        len(planhat.bulk_requests)
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    new = planhat.messages[before_ph:]
    assert sorted((m["userId"], m["traits"].get("power_users", m["traits"].get("score")))
                  for m in new) == [("u1", False), ("u1", 5.0), ("u4", True), ("u4", 30.0)]
    exit_call = next(m for m in new if m["traits"].get("power_users") is False)
    # An exit carries the contact traits the member had when last seen.
    assert exit_call["traits"] == {"email": "ann@example.com", "name": "Ann", "title": "CTO",
                                   "companyId": "c1", "power_users": False}
    assert len(segment.messages) - before_seg == 4
    assert len(planhat.bulk_requests) - before_bulk == 1
    assert planhat.endusers["u1"]["custom"] == {"power_users": False, "score": 5.0}
    assert planhat.endusers["u4"]["custom"] == {"power_users": True, "score": 30.0}

    # Third sync: nothing changed, nothing sent.
    counts = (planhat.requests, segment.requests)
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert (planhat.requests, segment.requests) == counts
    assert not planhat.duplicates() and not segment.duplicates()

    code, out, err = cli(capsys, "--config", str(config), "status", "--json")
    assert code == 0
    for item in json.loads(out)["computations"]:
        assert item["pending"] == {} and item["failed"] == {}
        assert item["initial_sync"] == "complete"
    for secret in SECRETS:
        assert secret not in out + err


def test_partial_bulk_failure_fails_exactly_those_members(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    users = [*USERS, ("u5", "eve@nowhere.org", "Eve", None, None, 99.0)]
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url, users=users,
                             trait=False)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 1  # a delivery failed
    report = json.loads(out)["deliveries"]["planhat_api"]
    assert (report["sent"], report["failed"]) == (3, 1)
    assert set(planhat.endusers) == {"u1", "u2", "u3"}

    code, out, err = cli(capsys, "--config", str(config), "deliveries", "--failed", "--json")
    assert code == 0, err
    failed = json.loads(out)
    assert [(f["user_id"], f["status"], f["destination"]) for f in failed] == [
        ("u5", "failed", "planhat_api")]
    assert failed[0]["last_error"] == "HTTP 206: no company matches this end user"

    # The operator fixes the data on Planhat's side, then asks for a retry.
    planhat.known_domains.add("nowhere.org")
    code, out, err = cli(capsys, "--config", str(config), "retry", "power_users", "--drain")
    assert code == 0, err
    assert "re-queued 1" in out
    assert planhat.endusers["u5"]["custom"] == {"power_users": True}
    code, out, err = cli(capsys, "--config", str(config), "deliveries", "--failed", "--json")
    assert json.loads(out) == []


def test_oversized_segment_message_fails_alone(
        tmp_path: Path, state_url: str, segment: FakeSegment,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    users = [*USERS, ("u6", "big@example.com", "x" * 40_000, None, None, 70.0)]
    config = delivery_config(tmp_path, state_url, segment=segment.url, users=users,
                             trait=False)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 1, err
    report = json.loads(out)["deliveries"]["segment"]
    assert (report["sent"], report["failed"]) == (3, 1)
    code, out, err = cli(capsys, "--config", str(config), "deliveries", "--failed")
    assert "u6" in out and "Segment accepts at most 32,768 bytes per message" in out, err
