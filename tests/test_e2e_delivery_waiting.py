"""A command that leaves deliveries it tried undelivered exits 1 and says how many wait, and why.

cron must not see success when a 500 storm, a refused connection or a long 429 kept every
delivery from going out. Applies to sync, resync and retry.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.delivery_setup import TENANT_TOKEN, delivery_config, set_env
from tests.fakes import FakePlanhat
from tests.helpers import cli

MEMBERS = 3  # of delivery_setup.USERS, in "Power Users"


@pytest.fixture
def planhat(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePlanhat]:
    set_env(monkeypatch)
    fake = FakePlanhat(tenant_token=TENANT_TOKEN)
    with fake.running():
        yield fake


def _waiting_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "deliveries still waiting" in line]
    assert len(lines) == 1, err
    return lines[0]


def test_sync_and_resync_exit_1_when_a_500_storm_leaves_everything_waiting(
        state_url: str, tmp_path: Path, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, trait=False)
    planhat.fail_next(10_000, "500")
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 1, out + err
    assert _waiting_line(err).startswith(f"planhat: {MEMBERS} deliveries still waiting (HTTP 500")
    code, out, err = cli(capsys, "--config", str(config), "resync", "power_users")
    assert code == 1, out + err
    # The resync's deliveries superseded the first ones: still one per member.
    assert _waiting_line(err).startswith(f"planhat: {MEMBERS} deliveries still waiting")
    assert planhat.acked == []


def test_sync_exits_1_when_the_destination_refuses_connections(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    set_env(monkeypatch)
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = delivery_config(tmp_path, state_url, planhat=closed, trait=False)
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json")
    assert code == 1, out + err
    assert f"planhat: {MEMBERS} deliveries still waiting (" in _waiting_line(err)
    assert '"waiting": 3' in out


def test_sync_exits_1_when_a_429_asks_for_longer_than_the_drain_waits(
        state_url: str, tmp_path: Path, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, trait=False)
    planhat.fail_next(10_000, "429", retry_after=3600)
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 1, out + err
    assert "429" in _waiting_line(err)
    assert planhat.acked == []


def test_retry_exits_1_when_what_it_requeued_is_still_waiting(
        state_url: str, tmp_path: Path, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, trait=False)
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    store = Store(f"{state_url}")
    with store.write() as conn:  # as if they had failed
        conn.execute(update(t.deliveries).values(status="failed"))
    store.dispose()
    planhat.fail_next(10_000, "500")
    code, out, err = cli(capsys, "--config", str(config), "retry", "--drain")
    assert code == 1, out + err
    assert _waiting_line(err).startswith(f"planhat: {MEMBERS} deliveries still waiting (HTTP 500")


def test_sync_that_delivers_everything_exits_0_and_prints_no_waiting_line(
        state_url: str, tmp_path: Path, planhat: FakePlanhat,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = delivery_config(tmp_path, state_url, planhat=planhat.url, trait=False)
    planhat.fail_next(2, "500")  # retried within the drain
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    assert "still waiting" not in err
    assert len(planhat.acked) == MEMBERS
