"""SIGKILL in the middle of a drain (a real subprocess), then a restart: nothing is lost and
only the claims in flight are sent twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update

from audience_sync.destinations.planhat import SEGMENT_MODE_CLAIM
from audience_sync.destinations.segment import MAX_BATCH_MESSAGES
from audience_sync.state import schema as t
from tests.delivery_setup import API_TOKEN, TENANT_TOKEN, WRITE_KEY, delivery_config, set_env
from tests.fakes import MAX_WAIT, FakePlanhat, FakeSegment, FakeServer
from tests.helpers import cli

USERS = [(f"k{i:04d}", None, None, None, "c1", 50.0) for i in range(450)]
# Killed once this many identifies were acknowledged: in the middle of the second claim.
KILL_AFTER = SEGMENT_MODE_CLAIM + SEGMENT_MODE_CLAIM // 2
MAX_RESTARTS = 3


def _expire_leases(state_url: str) -> None:
    """The killed process's audience lease runs out (its TTL passing, without waiting for it)."""
    engine = create_engine(state_url)
    with engine.begin() as conn:
        conn.execute(update(t.computations).values(
            lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    engine.dispose()


def _kill_mid_drain_then_restart(fake: FakeServer, config: Path, state_url: str,
                                 capsys: pytest.CaptureFixture[str], kill_after: int) -> int:
    """Run `sync` in a subprocess, SIGKILL it once `kill_after` messages were acknowledged
    (later requests are parked), then sync again until nothing is pending. Returns how many
    messages were acknowledged before the kill."""
    fake.hold_after(kill_after)
    env = {**os.environ, "PLANHAT_TENANT_TOKEN": TENANT_TOKEN,
           "PLANHAT_API_TOKEN": API_TOKEN, "SEGMENT_WRITE_KEY": WRITE_KEY}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "audience-sync"), "--config", str(config), "sync"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert fake.held.wait(MAX_WAIT), "the drain never reached the held request"
        process.send_signal(signal.SIGKILL)
        process.wait(MAX_WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(MAX_WAIT)
        assert process.stderr is not None
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    acked_before_kill = len(fake.acked)
    assert acked_before_kill >= kill_after
    fake.unhold()
    _expire_leases(state_url)
    for _ in range(MAX_RESTARTS):
        code, out, err = cli(capsys, "--config", str(config), "sync")
        assert code == 0, err
        code, out, err = cli(capsys, "--config", str(config), "status", "--json")
        [item] = json.loads(out)["computations"]
        if not item["pending"]:
            break
    assert item["pending"] == {} and item["initial_sync"] == "complete"
    return acked_before_kill


def test_sigkill_mid_drain_then_restart_delivers_everything(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as planhat:
        assert isinstance(planhat, FakePlanhat)
        config = delivery_config(tmp_path, state_url, planhat=planhat.url, users=USERS,
                                 trait=False)
        # One identify per request: exactly KILL_AFTER were acknowledged before the kill.
        assert _kill_mid_drain_then_restart(planhat, config, state_url, capsys,
                                            KILL_AFTER) == KILL_AFTER

    received = [m["userId"] for m in planhat.messages]
    assert set(received) == {u[0] for u in USERS}  # every change arrived
    duplicates = planhat.duplicates()
    # Only the claim in flight at the kill is sent again: acknowledged by the server, but its
    # outcomes never reached the state store.
    assert 0 < len(duplicates) <= SEGMENT_MODE_CLAIM
    assert set(duplicates.values()) == {2}
    first_claim = {m["userId"] for m in planhat.messages[:SEGMENT_MODE_CLAIM]}
    assert not first_claim & {planhat.messages[i]["userId"] for i in range(len(received))
                              if planhat.messages[i]["messageId"] in duplicates}


def test_sigkill_mid_segment_drain_resends_at_most_the_claims_on_the_wire(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two claims (batches) on the wire at once: a kill re-sends at most those two."""
    set_env(monkeypatch)
    users = [(f"s{i:05d}", None, None, None, "c1", 50.0) for i in range(6000)]
    window = 2
    with FakeSegment(WRITE_KEY).running() as segment:
        assert isinstance(segment, FakeSegment)
        config = delivery_config(tmp_path, state_url, segment=segment.url, users=users,
                                 trait=False, overrides={"segment": {"concurrency": window}})
        _kill_mid_drain_then_restart(segment, config, state_url, capsys, 1000)
    received = [m["userId"] for m in segment.messages]
    assert set(received) == {u[0] for u in users}  # every change arrived
    duplicates = segment.duplicates()
    assert len(duplicates) <= window * MAX_BATCH_MESSAGES
    assert set(duplicates.values()) <= {2}
