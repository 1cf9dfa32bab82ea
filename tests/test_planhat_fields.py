"""Planhat mode api: custom fields found or created once (across runs and processes), with
`create_fields: false` a check error whose deliveries wait; regional hosts; on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from audience_sync.config import PlanhatConfig
from audience_sync.destinations.planhat import ENDUSER, PlanhatApiDestination
from audience_sync.state.fields import StoredFields
from audience_sync.state.store import Store
from tests.delivery_setup import API_TOKEN, USERS, delivery_config, set_env
from tests.fakes import MAX_WAIT, FakePlanhat
from tests.helpers import cli, set_users


@pytest.fixture
def planhat(planhat: FakePlanhat) -> FakePlanhat:
    planhat.strict_fields = True  # an upsert to a field that does not exist is refused
    return planhat


def _lists(fake: FakePlanhat) -> int:
    return sum(1 for body in fake.request_bodies if body == b"")  # GET /customfields


def test_planhat_custom_fields_created_once_with_the_right_types(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    planhat.customfields.append({"_id": "x", "name": "score", "type": "number",
                                 "parent": "Company"})  # another parent's: not ours
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, err
    assert json.loads(out)["deliveries"]["planhat_api"]["sent"] == 7
    assert sorted(planhat.fields_created) == [("EndUser", "power_users", "checkbox"),
                                              ("EndUser", "score", "number")]
    assert planhat.endusers["u1"]["custom"] == {"power_users": True, "score": 50.0}
    assert _lists(planhat) == 1
    # Later runs (new processes' destinations) know the fields from the state store: no
    # listing, no creation.
    set_users(tmp_path / "warehouse.db", [(*USERS[0][:5], 5.0), *USERS[1:]])
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, err
    assert planhat.endusers["u1"]["custom"] == {"power_users": False, "score": 5.0}
    assert len(planhat.fields_created) == 2 and _lists(planhat) == 1


def test_a_field_is_created_once_by_two_processes_at_once(
        state_url: str, planhat: FakePlanhat) -> None:
    """Two drains (two stores, two destinations: two processes' worth) both find the field
    missing; the state store lets one create it, the other waits and then finds it."""
    stores = [Store(state_url) for _ in range(2)]
    stores[0].upgrade()
    config = PlanhatConfig(type="planhat", mode="api", api_token=API_TOKEN,
                           base_url=planhat.url, rate_limit="2000/s")
    first_inside = threading.Event()
    release = threading.Event()

    class Slow(StoredFields):
        """Holds its creation open until the other process is waiting on it."""

        def creating(self, parent: str, name: str, kind: str):  # type: ignore[no-untyped-def]
            outer = super().creating(parent, name, kind)

            class Hold:
                def __enter__(self) -> bool:
                    mine = outer.__enter__()
                    first_inside.set()
                    release.wait(MAX_WAIT)
                    return mine

                def __exit__(self, *exc: object) -> bool | None:
                    return outer.__exit__(*exc)  # type: ignore[arg-type]
            return Hold()

    destinations = [PlanhatApiDestination("planhat", config, fields=Slow(stores[0], "planhat")),
                    PlanhatApiDestination("planhat", config,
                                          fields=StoredFields(stores[1], "planhat"))]
    answers: list[dict[str, str]] = []
    first = threading.Thread(target=lambda: answers.append(
        destinations[0].ensure_fields({(ENDUSER, "vip"): "checkbox"})))
    first.start()
    assert first_inside.wait(MAX_WAIT)
    # The second lists the fields before the first created its own: "vip" is missing.
    second = threading.Thread(target=lambda: answers.append(
        destinations[1].ensure_fields({(ENDUSER, "vip"): "checkbox"})))
    second.start()
    second.join(0.5)  # it is now waiting on the first's row (or listing): let it get there
    release.set()
    first.join(MAX_WAIT)
    second.join(MAX_WAIT)
    for destination in destinations:
        destination.close()
    for store in stores:
        store.dispose()
    assert answers == [{}, {}]
    assert planhat.fields_created == [("EndUser", "vip", "checkbox")]


def test_create_fields_false_fails_check_and_holds_the_deliveries(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url, trait=False,
                             overrides={"planhat_api": {"create_fields": False}})
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("destinations.planhat_api"))
    assert "FAILED" in line and "power_users" in line and "create_fields is false" in line
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    report = json.loads(out)["deliveries"]["planhat_api"]
    assert report["sent"] == 0 and report["failed"] == 0
    assert planhat.fields_created == [] and planhat.bulk_requests == []
    code, out, err = cli(capsys, "--config", str(config), "status", "--json")
    [item] = json.loads(out)["computations"]
    assert item["pending"] == {"planhat_api": 3} and item["failed"] == {}
    # The operator creates the field in Planhat: check passes, the waiting deliveries go.
    planhat.customfields.append({"_id": "f1", "name": "power_users", "type": "checkbox",
                                 "parent": "EndUser"})
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 0, out + err
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 0, out + err
    assert set(planhat.endusers) == {"u1", "u2", "u3"} and planhat.fields_created == []


@pytest.mark.parametrize("subdomain", ["api", "api-eu", "api-eu2", "api-us2", "api-us4"])
def test_planhat_regional_hosts_are_accepted_and_named_by_check(subdomain: str) -> None:
    config = PlanhatConfig(type="planhat", mode="api", api_token=API_TOKEN,
                           subdomain=subdomain, timeout="1s", max_retries=0)
    assert config.url == f"https://{subdomain}.planhat.com"
    destination = PlanhatApiDestination("planhat", config)
    try:
        assert destination.sender.shown_url == f"https://{subdomain}.planhat.com"
    finally:
        destination.close()


def test_check_says_which_planhat_host_it_reached(
        tmp_path: Path, state_url: str, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    config = delivery_config(tmp_path, state_url, planhat_api=planhat.url, trait=False)
    _, out, _ = cli(capsys, "--config", str(config), "check")
    line = next(x for x in out.splitlines() if x.startswith("destinations.planhat_api"))
    assert f"accepted by {planhat.url}" in line
    assert "custom fields to create at the first upsert: power_users" in line
    assert planhat.fields_created == []  # check creates nothing
