"""Who reaches the dashboard: loopback by default, a token everywhere else, on `ui` and on the
daemon's health port; the token never shows in a page, a cookie or a log."""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from audience_sync.cli.daemon import _dashboard
from audience_sync.config import load_config
from audience_sync.health import HealthServer, Metrics
from audience_sync.state.store import Store
from tests.daemon_harness import AUDIENCE_SYNC
from tests.helpers import cli
from tests.ui_setup import UIProject, built_project, request, serving

TOKEN = "ui-SECRET-7d41c9"


@pytest.fixture
def ui_project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[UIProject]:
    with built_project(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", capsys) as project:
        yield project


def test_ui_on_a_non_loopback_address_without_token_refuses_to_start(
        ui_project: UIProject, capsys: pytest.CaptureFixture[str]) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        code, out, err = cli(capsys, "--config", str(ui_project.path), "ui", "--host", host,
                             "--port", "0")
        assert code == 2, err
        assert out == "" and len(err.strip().splitlines()) == 1
        assert "not a loopback address" in err and "--ui-token" in err


def test_requests_without_the_token_get_401_and_no_data(
        ui_project: UIProject, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []
    with serving(ui_project, token=TOKEN) as base:
        for path in ("/", "/audiences/high_scorers", "/audiences/high_scorers/users/u1",
                     "/api/status", "/api/audiences/high_scorers"):
            for headers in ({}, {"Authorization": "Bearer wrong"},
                            {"Cookie": "audience_sync_ui=" + TOKEN}):
                code, body, _ = request(base + path, headers=headers)
                assert code == 401, (path, headers)
                # Only the path asked for comes back (where to go after signing in).
                shown = re.sub(r'<input type="hidden" name="next" value="[^"]*">', "", body)
                for data in ("u1", "high_scorers", "Scorers", "example.com", '"members"'):
                    assert data not in shown, (path, data)
                bodies.append(body)

        code, body, _ = request(base + "/api/status",
                                headers={"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and "high_scorers" in body
        bodies.append(body)

        # The login form: a wrong token is 401; the right one sets a session cookie.
        code, body, _ = request(base + "/login", data=urlencode(
            {"token": "nope", "next": "/"}).encode())
        assert code == 401 and "not the right one" in body
        code, body, headers = request(base + "/login", data=urlencode(
            {"token": TOKEN, "next": "/audiences/high_scorers"}).encode())
        assert code == 303 and headers["Location"] == "/audiences/high_scorers"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        session = cookie.split(";", 1)[0]
        code, body, _ = request(base + "/audiences/high_scorers", headers={"Cookie": session})
        assert code == 200 and '<b id="members">5</b>' in body
        bodies.append(body)
        # A login never redirects to another site.
        code, _, headers = request(base + "/login", data=urlencode(
            {"token": TOKEN, "next": "//evil.example/"}).encode())
        assert code == 303 and headers["Location"] == "/"
    assert not any(TOKEN in body for body in bodies)
    assert TOKEN not in caplog.text


def test_daemon_health_port_serves_the_dashboard_under_the_same_rules(
        ui_project: UIProject, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(ui_project.path)
    store = Store(config.state_db)
    metrics = Metrics(store, config)
    try:
        # Bound to every address without a token: probes and scrapes only, no page.
        assert _dashboard(store, config, "0.0.0.0", None) is None
        assert "the dashboard is off on 0.0.0.0" in caplog.text
        for host, token in (("127.0.0.1", None), ("0.0.0.0", TOKEN)):
            server = HealthServer(metrics, "127.0.0.1", 0,
                                  ui=_dashboard(store, config, host, token)).start()
            base = f"http://127.0.0.1:{server.port}"
            try:
                assert request(base + "/healthz")[0] == 200
                assert request(base + "/metrics")[0] == 200
                code, body, _ = request(base + "/audiences/high_scorers")
                if token is None:
                    assert code == 200 and '<b id="members">5</b>' in body
                else:
                    assert code == 401 and "u1" not in body
                    code, body, _ = request(base + "/api/audiences/high_scorers/users/u1",
                                            headers={"Authorization": f"Bearer {token}"})
                    assert code == 200 and '"user_id": "u1"' in body
            finally:
                server.stop()
        off = HealthServer(metrics, "127.0.0.1", 0, ui=None).start()
        try:
            code, body, _ = request(f"http://127.0.0.1:{off.port}/")
            assert code == 404 and "high_scorers" not in body
        finally:
            off.stop()
    finally:
        store.dispose()


def test_ui_token_comes_from_config_as_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "state_db: sqlite:///s.db\nui_token: ${UI_TOKEN}\n"
        "sources: {w: {url: 'sqlite:///w.db'}}\n"
        "destinations: {f: {type: jsonl, path: o.jsonl}}\n"
        "audiences: [{name: A, source: w, destinations: [f], query: SELECT 1 AS user_id}]\n")
    config = load_config(path, env={"UI_TOKEN": f"  {TOKEN}\n"})
    assert config.ui_token == TOKEN  # a file-mounted secret's newline is stripped
    assert TOKEN not in repr(config.model) and TOKEN not in str(config.model.model_dump())


def test_ui_command_serves_with_a_token_and_stops_on_ctrl_c(ui_project: UIProject) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AUDIENCE_SYNC_CONFIG"}
    env["AUDIENCE_SYNC_UI_TOKEN"] = TOKEN
    proc = subprocess.Popen([AUDIENCE_SYNC, "--config", str(ui_project.path), "ui", "--host",
                             "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout is not None, "the ui command printed nothing"
        line = proc.stdout.readline()
        match = re.search(r"http://0\.0\.0\.0:(\d+)/ \(token required\)", line)
        assert match, line
        base = f"http://127.0.0.1:{match.group(1)}"
        assert request(base + "/")[0] == 401
        code, body, _ = request(base + "/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and "high_scorers" in body
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        _out, err = proc.communicate(timeout=30)
        assert TOKEN not in line + _out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
