"""Planhat mode api, account audiences as companies: an account's (group) rows go to the bulk
`PUT /companies`, matched by externalId, the key as a Company custom field (created once per
parent, across destinations sharing the state store's ledger); 206 answers and
`create_fields: false` handled as for end users; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from audience_sync.config import PlanhatConfig
from audience_sync.destinations import check_destination
from audience_sync.destinations.base import Outcome
from audience_sync.destinations.planhat import PlanhatApiDestination
from audience_sync.messages import GROUP, Delivery
from audience_sync.state.fields import StoredFields
from audience_sync.state.store import Store
from tests.delivery_setup import API_TOKEN, TENANT_TOKEN, delivery_config, set_env
from tests.fakes import Answer, FakePlanhat
from tests.helpers import cli, write_config

AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def planhat(planhat: FakePlanhat) -> FakePlanhat:
    planhat.strict_fields = True  # an upsert to a field that does not exist is refused
    return planhat


@pytest.fixture
def store(state_url: str) -> Iterator[Store]:
    store = Store(state_url)
    store.upgrade()
    try:
        yield store
    finally:
        store.dispose()


def _config(fake: FakePlanhat, **settings: object) -> PlanhatConfig:
    return PlanhatConfig.model_validate({
        "type": "planhat", "mode": "api", "api_token": API_TOKEN, "base_url": fake.url,
        "rate_limit": "2000/s", "max_retries": 0, **settings})


def _account(id: int, account: str, key: str, value: str, name: str | None = None, *,
             kind: str = "audience") -> Delivery:
    """An account audience's (or trait's) row: the account id as user_id, its name."""
    return Delivery(id, key, kind, 1, "planhat", account, value, None, name, None, None, AT,
                    call=GROUP)


def _user(id: int, user: str, key: str, value: str, call: str = "identify") -> Delivery:
    return Delivery(id, key, "audience", 1, "planhat", user, value, f"{user}@example.com",
                    None, None, "c1", AT, call=call)


def _lists(fake: FakePlanhat) -> int:
    return sum(1 for body in fake.request_bodies if body == b"")  # GET /customfields


def _send(destination: PlanhatApiDestination, batch: list[Delivery]) -> dict[int, Outcome]:
    outcomes = destination.send(batch)
    assert sorted(o.delivery_id for o in outcomes) == sorted(d.id for d in batch)
    return {o.delivery_id: o for o in outcomes}


def test_companies_upserted_by_external_id_with_the_key_as_a_company_field_created_once(
        store: Store, planhat: FakePlanhat) -> None:
    # An end-user field of the same name is not the company's.
    planhat.customfields.append({"_id": "x", "name": "big_accounts", "type": "checkbox",
                                 "parent": "EndUser"})
    first = PlanhatApiDestination("planhat", _config(planhat),
                                  fields=StoredFields(store, "planhat"))
    try:
        outcomes = _send(first, [
            _account(1, "c1", "big_accounts", "true", "Acme"),
            _account(2, "c1", "arr", "1200.5", "Acme", kind="trait"),
            _account(3, "c2", "big_accounts", "false", "Beta")])
    finally:
        first.close()
    assert all(o.ok for o in outcomes.values()), outcomes
    assert sorted(planhat.fields_created) == [("Company", "arr", "number"),
                                              ("Company", "big_accounts", "checkbox")]
    # One request, one item per account (its keys merged), no end user touched.
    assert planhat.company_requests == [[
        {"externalId": "c1", "name": "Acme", "custom": {"big_accounts": True, "arr": 1200.5}},
        {"externalId": "c2", "name": "Beta", "custom": {"big_accounts": False}}]]
    assert planhat.bulk_requests == [] and planhat.endusers == {}
    assert planhat.companies["c1"] == {"externalId": "c1", "name": "Acme",
                                       "custom": {"big_accounts": True, "arr": 1200.5}}
    assert planhat.companies["c2"]["custom"] == {"big_accounts": False}
    assert _lists(planhat) == 1

    # Another destination (another process's) on the same ledger: no listing, no creation.
    second = PlanhatApiDestination("planhat", _config(planhat),
                                   fields=StoredFields(store, "planhat"))
    try:
        # An account whose name the definition does not return: its name is left alone.
        outcomes = _send(second, [_account(4, "c1", "big_accounts", "false", "Acme"),
                                  _account(5, "c2", "arr", "7", kind="trait")])
    finally:
        second.close()
    assert all(o.ok for o in outcomes.values()), outcomes
    assert len(planhat.fields_created) == 2 and _lists(planhat) == 1
    assert planhat.companies["c1"]["custom"] == {"big_accounts": False, "arr": 1200.5}
    assert planhat.company_requests[1][1] == {"externalId": "c2", "custom": {"arr": 7}}
    assert planhat.companies["c2"] == {"externalId": "c2", "name": "Beta",
                                       "custom": {"big_accounts": False, "arr": 7}}


def test_end_users_companies_and_activities_of_one_claim_each_go_to_their_endpoint(
        store: Store, planhat: FakePlanhat) -> None:
    config = _config(planhat, tenant_token=TENANT_TOKEN, analytics_base_url=planhat.url,
                     send=["identify", "track"])
    destination = PlanhatApiDestination("planhat", config,
                                        fields=StoredFields(store, "planhat"))
    try:
        outcomes = _send(destination, [
            _user(1, "u1", "power_users", "true"),
            _account(2, "c1", "big_accounts", "true", "Acme"),
            _user(3, "u1", "power_users", "true", call="track"),
            _account(4, "c2", "power_users", "true", "Beta")])
    finally:
        destination.close()
    assert all(o.ok for o in outcomes.values()), outcomes
    # The same key on both parents: one field each, from one listing.
    assert sorted(planhat.fields_created) == [("Company", "big_accounts", "checkbox"),
                                              ("Company", "power_users", "checkbox"),
                                              ("EndUser", "power_users", "checkbox")]
    assert _lists(planhat) == 1
    assert planhat.bulk_requests == [[{"externalId": "u1", "email": "u1@example.com",
                                       "companyId": "c1", "custom": {"power_users": True}}]]
    assert [[i["externalId"] for i in r] for r in planhat.company_requests] == [["c1", "c2"]]
    assert planhat.companies["c1"]["custom"] == {"big_accounts": True}
    assert planhat.companies["c2"] == {"externalId": "c2", "name": "Beta",
                                       "custom": {"power_users": True}}
    assert [(a["externalId"], a["action"]) for a in planhat.activities] == [
        ("u1", "Audience Entered")]


def test_6001_companies_go_out_in_two_requests(planhat: FakePlanhat) -> None:
    planhat.customfields.append({"_id": "f", "name": "big_accounts", "type": "checkbox",
                                 "parent": "Company"})
    destination = PlanhatApiDestination("planhat", _config(planhat))
    try:
        outcomes = _send(destination, [_account(i + 1, f"c{i}", "big_accounts", "true",
                                                f"Company {i}") for i in range(6001)])
    finally:
        destination.close()
    assert all(o.ok for o in outcomes.values())
    assert [len(r) for r in planhat.company_requests] == [5000, 1001]
    assert len(planhat.companies) == 6001 and planhat.bulk_requests == []


def test_a_206_naming_one_company_fails_only_that_one(planhat: FakePlanhat) -> None:
    planhat.customfields.append({"_id": "f", "name": "big_accounts", "type": "checkbox",
                                 "parent": "Company"})
    destination = PlanhatApiDestination("planhat", _config(planhat))
    try:
        # c2 is new and has no name: Planhat cannot create it (the fake's 206 names it).
        outcomes = _send(destination, [_account(1, "c1", "big_accounts", "true", "Acme"),
                                       _account(2, "c2", "big_accounts", "true"),
                                       _account(3, "c3", "big_accounts", "false", "Gamma")])
        assert planhat.statuses[206] == 1
        assert outcomes[1].ok and outcomes[3].ok
        assert not outcomes[2].ok and outcomes[2].permanent
        assert outcomes[2].error is not None and "a new company needs a name" in \
            outcomes[2].error
        assert set(planhat.companies) == {"c1", "c3"}
        # A 206 that names no company proves nothing: every one is retried, none failed.
        planhat.bulk_answers.append(Answer(206, {"createdErrors": []}))
        outcomes = _send(destination, [_account(4, "c1", "big_accounts", "false", "Acme"),
                                       _account(5, "c3", "big_accounts", "true", "Gamma")])
    finally:
        destination.close()
    assert not any(o.ok or o.permanent for o in outcomes.values())
    assert all("did not attribute to these companies" in (o.error or "")
               for o in outcomes.values())


def test_create_fields_false_keeps_company_deliveries_waiting_and_check_names_the_field(
        planhat: FakePlanhat) -> None:
    # The end users' field exists; a same-named end-user field does not make the company's.
    planhat.customfields += [
        {"_id": "f1", "name": "power_users", "type": "checkbox", "parent": "EndUser"},
        {"_id": "f2", "name": "big_accounts", "type": "checkbox", "parent": "EndUser"}]
    config = _config(planhat, create_fields=False)
    ok, said = check_destination("planhat", config, [("power_users", "audience", "user"),
                                                     ("big_accounts", "audience", "account")])
    assert not ok
    assert "big_accounts (company)" in said and "create_fields is false" in said
    assert "power_users" not in said
    destination = PlanhatApiDestination("planhat", config)
    try:
        outcomes = _send(destination, [_user(1, "u1", "power_users", "true"),
                                       _account(2, "c1", "big_accounts", "true", "Acme")])
        assert outcomes[1].ok
        waiting = outcomes[2]
        assert not waiting.ok and not waiting.permanent and waiting.attempts == 0
        assert waiting.error is not None
        assert "company custom field 'big_accounts'" in waiting.error
        assert "create_fields is false" in waiting.error
        assert planhat.company_requests == [] and planhat.fields_created == []
        # The operator creates the company field: check passes, the waiting delivery goes.
        planhat.customfields.append({"_id": "f3", "name": "big_accounts", "type": "checkbox",
                                     "parent": "Company"})
        ok, said = check_destination("planhat", config,
                                     [("big_accounts", "audience", "account")])
        assert ok, said
        outcomes = _send(destination, [_account(2, "c1", "big_accounts", "true", "Acme")])
    finally:
        destination.close()
    assert outcomes[2].ok
    assert planhat.companies["c1"]["custom"] == {"big_accounts": True}
    assert planhat.fields_created == []


def test_check_names_a_missing_company_field_of_an_account_audience(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`check` checks an account audience sent as companies against Company fields."""
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url, trait=False,
                             overrides={"planhat_api": {"create_fields": False}})
    document = yaml.safe_load(config.read_text())
    document["audiences"].append({
        "name": "Big Accounts", "source": "warehouse", "level": "account",
        "destinations": ["planhat_api"],
        "query": "SELECT DISTINCT company_id AS group_id FROM users WHERE company_id = 'c1'"})
    write_config(config, document)
    planhat.customfields.append({"_id": "f1", "name": "power_users", "type": "checkbox",
                                 "parent": "EndUser"})
    _, out, err = cli(capsys, "--config", str(config), "check")
    line = next(x for x in out.splitlines() if x.startswith("destinations.planhat_api"))
    assert "FAILED" in line and "big_accounts (company)" in line, out + err
    assert "power_users" not in line
