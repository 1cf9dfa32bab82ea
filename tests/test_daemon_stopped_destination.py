"""A destination the daemon stopped (credentials refused) is tried again after a pause, with a
client built afresh: a passing 401 no longer stops it until the daemon restarts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from audience_sync.config import load_config
from audience_sync.scheduler import STOPPED_DESTINATION_RETRY, Daemon, DaemonOptions
from audience_sync.state.store import Store
from tests.delivery_setup import TENANT_TOKEN, delivery_config, set_env
from tests.fakes import FakePlanhat

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def test_a_refused_destination_is_retried_after_the_pause_with_a_fresh_client(
        tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    with FakePlanhat("not-yet-valid").running() as planhat:
        assert isinstance(planhat, FakePlanhat)
        config = load_config(delivery_config(tmp_path, state_url, planhat=planhat.url,
                                             trait=False))
        store = Store(state_url)
        store.upgrade()
        store.register(config.computations, T0)
        now = [T0]
        daemon = Daemon(store, config, DaemonOptions(owner="test"), clock=lambda: now[0])
        try:
            daemon.tick()  # the initial run; its drain meets 401 and stops
            refused = planhat.requests
            assert refused >= 1 and planhat.messages == []
            planhat.tenant_token = TENANT_TOKEN  # the credentials work again
            now[0] = T0 + STOPPED_DESTINATION_RETRY - timedelta(seconds=1)
            daemon.tick()  # still within the pause: nothing is tried
            assert planhat.requests == refused
            now[0] = T0 + STOPPED_DESTINATION_RETRY
            daemon.tick()
            assert sorted(m["userId"] for m in planhat.messages) == ["u1", "u2", "u3"]
        finally:
            daemon.close()
            store.dispose()
