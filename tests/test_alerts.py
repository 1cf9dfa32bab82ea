"""Alerts: the pure decision (tables of cases), and webhooks against a local receiver from CLI
`sync` on SQLite and PostgreSQL: once per state change, never failing a run, URL never shown."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_sync.alerts import AlertState, Rule, RunOutcome, after_drain, after_run
from audience_sync.config import load_config
from audience_sync.states import RunStatus
from tests.helpers import cli, make_warehouse, set_users, write_config

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
ALL = frozenset({"failed", "held", "recovered", "size_change", "deliveries_failed"})
SECRET = "T000SECRETPATH"
TOKEN = "q5ecr3t"


# -- the decision ------------------------------------------------------------------------------

def _run(status: RunStatus, members: int = 10, previous: int = 10, failures: int = 0,
         ) -> RunOutcome:
    return RunOutcome("aud", 7, status, members, previous, failures, T0, "why")


S, F, H = RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.HELD


@pytest.mark.parametrize(("runs", "rule", "expected"), [
    # three failed runs in a row: one `failed`, then one `recovered`
    ([(F, 1), (F, 2), (F, 3), (S, 0)], Rule(ALL), ["failed", "recovered"]),
    # failures: 3 waits for the third consecutive failure
    ([(F, 1), (F, 2), (S, 0)], Rule(ALL, failures=3), []),
    ([(F, 1), (F, 2), (F, 3), (F, 4), (S, 0)], Rule(ALL, failures=3), ["failed", "recovered"]),
    # a held run retried each cadence: one `held`, and `recovered` once it is applied
    ([(H, 0), (H, 0), (H, 0), (S, 0)], Rule(ALL), ["held", "recovered"]),
    # only what `on` asks for, but the state still follows (no late `recovered`)
    ([(F, 1), (S, 0), (S, 0)], Rule(frozenset({"failed"})), ["failed"]),
    ([(F, 1), (F, 2), (S, 0)], Rule(frozenset({"recovered"})), ["recovered"]),
    # succeeded runs without a failure before: nothing
    ([(S, 0), (S, 0)], Rule(ALL), []),
])
def test_alerts_fire_once_per_state_change(runs: list[tuple[RunStatus, int]], rule: Rule,
                                           expected: list[str]) -> None:
    state = AlertState()
    fired: list[str] = []
    for status, failures in runs:
        alerts, state = after_run(state, _run(status, failures=failures), rule)
        fired += [a.event for a in alerts]
    assert fired == expected


@pytest.mark.parametrize(("previous", "members", "threshold", "fires"), [
    (100, 121, 0.2, True), (100, 79, 0.2, True), (100, 120, 0.2, False),
    (100, 80, 0.2, False), (0, 500, 0.2, False), (10, 16, 0.5, True),
])
def test_size_change_fires_past_the_threshold(previous: int, members: int, threshold: float,
                                              fires: bool) -> None:
    alerts, _ = after_run(AlertState(), _run(S, members, previous), Rule(ALL, threshold=threshold))
    assert [a.event for a in alerts] == (["size_change"] if fires else [])


@pytest.mark.parametrize(("counts", "expected"), [
    ([0, 3, 3, 3], [3]),  # three failed: one alert, not one per drain
    ([2, 5, 5], [2, 5]),  # more failed later: alert again
    ([2, 0, 1], [2, 1]),  # retried (back to 0), then one failed anew
])
def test_deliveries_failed_alerts_only_on_new_failures(counts: list[int],
                                                        expected: list[int]) -> None:
    state = AlertState()
    fired: list[int] = []
    for failed in counts:
        alerts, state = after_drain(state, "aud", failed, T0, Rule(ALL))
        fired += [a.counts["failed"] for a in alerts]
    assert fired == expected


def test_an_alert_body_is_slack_text_plus_fields() -> None:
    alerts, _ = after_run(AlertState(), _run(F, failures=1), Rule(ALL))
    body = alerts[0].body()
    assert body["text"].startswith("audience-sync: aud: run failed")
    assert {k: body[k] for k in ("event", "audience", "run_id", "reason", "at")} == {
        "event": "failed", "audience": "aud", "run_id": 7, "reason": "why",
        "at": "2026-11-01T12:00:00Z"}
    assert body["counts"]["consecutive_failures"] == 1


def test_an_unquoted_on_key_is_read(tmp_path: Path) -> None:
    """YAML 1.1 reads `on:` as the boolean true; the alert still gets its events."""
    warehouse = make_warehouse(tmp_path / "w.db")
    path = tmp_path / "config.yaml"
    path.write_text(f"""
sources: {{w: {{url: "{warehouse}"}}}}
destinations: {{file: {{type: jsonl, path: out.jsonl}}}}
audiences:
  - {{name: A, source: w, destinations: [file], query: "SELECT id AS user_id FROM users"}}
alerts:
  - type: webhook
    url: ${{HOOK:-https://hooks.example.com/services/x}}
    on: [held, recovered]
    failures: 2
""")
    alert = load_config(path, env={}).alerts[0]
    assert alert.on == ["held", "recovered"] and alert.failures == 2
    assert alert.url.get_secret_value() == "https://hooks.example.com/services/x"


# -- webhooks from the CLI ---------------------------------------------------------------------

class Receiver:
    """A tiny webhook receiver: keeps every JSON body it was posted."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.down = False  # answer 503 to everything
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length))
                if receiver.down:
                    receiver.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                receiver.bodies.append(body)
                receiver.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    @property
    def events(self) -> list[str]:
        return [body["event"] for body in self.bodies]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/{SECRET}?t={TOKEN}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()


def _users(n: int) -> list[tuple[object, ...]]:
    return [(f"u{i}", None, None, None, None, 50.0) for i in range(n)]


def _setup(tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, url: str,
           users: int = 10) -> str:
    make_warehouse(tmp_path / "w.db", _users(users))
    monkeypatch.setenv("ALERT_WEBHOOK_URL", url)
    write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'w.db'}"}},
        "destinations": {"file": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}},
        "audiences": [{"name": "Scored", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id FROM users WHERE score > 10"}],
        "alerts": [{"type": "webhook", "url": "${ALERT_WEBHOOK_URL}", "threshold": 0.2}],
    })
    return str(tmp_path / "config.yaml")


def _sync(capsys: pytest.CaptureFixture[str], config: str) -> int:
    code, out, err = cli(capsys, "--config", config, "sync", "-v")
    assert SECRET not in out + err and TOKEN not in out + err
    return code


def _rename_users(tmp_path: Path, old: str, new: str) -> None:
    db = sqlite3.connect(tmp_path / "w.db")
    db.execute(f"ALTER TABLE {old} RENAME TO {new}")
    db.commit()
    db.close()


def test_a_failing_audience_alerts_once_and_once_when_it_recovers(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], receiver: Receiver) -> None:
    config = _setup(tmp_path, state_url, monkeypatch, receiver.url)
    assert _sync(capsys, config) == 0
    _rename_users(tmp_path, "users", "users_gone")
    for _ in range(3):
        assert _sync(capsys, config) == 1
    assert receiver.events == ["failed"]
    _rename_users(tmp_path, "users_gone", "users")
    assert _sync(capsys, config) == 0
    assert _sync(capsys, config) == 0
    assert receiver.events == ["failed", "recovered"]
    failed = receiver.bodies[0]
    assert failed["audience"] == "scored" and failed["run_id"] and "users" in failed["reason"]
    assert failed["text"] and failed["at"].endswith("Z")
    assert receiver.paths[0] == f"/services/{SECRET}?t={TOKEN}"


def test_a_held_run_alerts_once(state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], receiver: Receiver) -> None:
    config = _setup(tmp_path, state_url, monkeypatch, receiver.url)
    assert _sync(capsys, config) == 0
    set_users(tmp_path / "w.db", _users(2))  # 8 of 10 would leave: held
    assert _sync(capsys, config) != 0
    assert _sync(capsys, config) != 0
    assert receiver.events == ["held"]
    assert receiver.bodies[0]["counts"]["exited"] == 8


def test_a_size_change_over_the_threshold_alerts(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], receiver: Receiver) -> None:
    config = _setup(tmp_path, state_url, monkeypatch, receiver.url)
    assert _sync(capsys, config) == 0
    set_users(tmp_path / "w.db", _users(11))  # +10%: below 20%
    assert _sync(capsys, config) == 0
    assert receiver.events == []
    set_users(tmp_path / "w.db", _users(15))  # 11 -> 15: +36%
    assert _sync(capsys, config) == 0
    assert receiver.events == ["size_change"]
    assert receiver.bodies[0]["counts"] == {"members": 15, "previous_members": 11,
                                            "entered": 4, "exited": 0}


def test_an_unreachable_webhook_does_not_fail_the_run(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _setup(tmp_path, state_url, monkeypatch,
                    f"http://127.0.0.1:{port}/services/{SECRET}?t={TOKEN}")
    assert _sync(capsys, config) == 0
    set_users(tmp_path / "w.db", _users(20))  # a size change: an alert to send
    code, out, err = cli(capsys, "--config", config, "sync", "-v")
    assert code == 0
    assert "size_change alert for scored not delivered" in err
    assert SECRET not in out + err and TOKEN not in out + err


def test_an_alert_the_webhook_missed_is_sent_when_the_condition_is_found_again(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], receiver: Receiver) -> None:
    config = _setup(tmp_path, state_url, monkeypatch, receiver.url)
    assert _sync(capsys, config) == 0
    _rename_users(tmp_path, "users", "users_gone")
    receiver.down = True
    assert _sync(capsys, config) == 1  # `failed` is decided, and not delivered
    assert receiver.refused == 3 and receiver.events == []
    receiver.down = False
    assert _sync(capsys, config) == 1
    assert _sync(capsys, config) == 1
    assert receiver.events == ["failed"]  # once, when the condition was found again
    assert receiver.bodies[0]["counts"]["consecutive_failures"] == 2


# -- the daemon --------------------------------------------------------------------------------

def test_the_daemon_alerts_once_per_state_change_and_prunes_once_a_day(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        receiver: Receiver) -> None:
    from sqlalchemy import select

    from audience_sync.scheduler import Daemon, DaemonOptions
    from audience_sync.state import queries
    from audience_sync.state import schema as t
    from audience_sync.state.store import Store

    config = load_config(_setup(tmp_path, state_url, monkeypatch, receiver.url))
    store = Store(state_url)
    store.upgrade()
    now = [T0]
    store.register(config.computations, T0)
    daemon = Daemon(store, config, DaemonOptions(owner="test"), clock=lambda: now[0])

    def tick(at: datetime) -> None:
        now[0] = at
        daemon.tick()

    def last_prune() -> datetime:
        with store.read() as conn:
            return conn.execute(select(t.housekeeping.c.last_run_at)).scalar_one()

    try:
        tick(T0)  # the initial run, its drain, and the first prune
        assert last_prune() == T0
        _rename_users(tmp_path, "users", "users_gone")
        for day in (1, 2, 3):  # a failed run each day (and many ticks between them)
            tick(T0 + timedelta(days=day))
            tick(T0 + timedelta(days=day, minutes=1))
        assert [r.status for r in queries.runs(store)][:3] == ["failed"] * 3
        assert last_prune() == T0 + timedelta(days=3)  # once a day, not per tick
        _rename_users(tmp_path, "users_gone", "users")
        tick(T0 + timedelta(days=5))
        assert queries.runs(store)[0].status == "succeeded"
        with store.read() as conn:
            sent = conn.execute(select(t.deliveries.c.id)).all()
        assert len(sent) == 10  # sent at T0, kept within the 30d retention
        tick(T0 + timedelta(days=31))
        with store.read() as conn:
            assert conn.execute(select(t.deliveries.c.id)).all() == []
    finally:
        daemon.close()  # sends what is queued (bounded)
        store.dispose()
    assert receiver.events == ["failed", "recovered"]


def test_permanently_failed_deliveries_alert_once(
        state_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], receiver: Receiver) -> None:
    from tests.fakes import EchoServer

    with EchoServer().running() as refuser:  # its first answer is a 400: failed for good
        config = _setup(tmp_path, state_url, monkeypatch, receiver.url, users=4)
        document = yaml.safe_load(Path(config).read_text())
        document["destinations"]["seg"] = {"type": "segment", "write_key": "wk",
                                           "base_url": refuser.url, "max_retries": 0}
        document["audiences"][0]["destinations"] = ["seg"]
        write_config(Path(config), document)
        assert _sync(capsys, config) == 1
        _sync(capsys, config)  # nothing new failed: no second alert
    assert receiver.events == ["deliveries_failed"]
    assert receiver.bodies[0]["counts"] == {"failed": 4, "new": 4}
