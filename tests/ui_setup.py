"""A state store with several real runs for the dashboard tests, and the dashboard serving it.

Three syncs of an audience (6 members, then u1 out and u6 in, then u2 out), a trait, an audience
whose source query fails, and a destination that rejects every call (failed deliveries with a
reason). User data carries `<script>` everywhere it can: an audience name, a user id, the
rejection text, a source error.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from audience_sync.config import Config, load_config
from audience_sync.state.store import Store
from audience_sync.ui.app import Dashboard
from audience_sync.ui.server import UIServer
from tests.fakes import Answer, FakeServer
from tests.helpers import cli, make_warehouse, set_users, write_config

SCRIPT_USER = "<script>alert('user')</script>"
SCRIPT_NAME = "High <script>alert('name')</script> Scorers"
SCRIPT_REASON = "<script>alert('reason')</script> rejected"
SCRIPT_TABLE = "<script>alert('table')</script>"


class Rejecting(FakeServer):
    """A Segment-compatible endpoint that refuses every batch for good (400), quoting HTML."""

    def route(self, method: str, path: str, auth: str, body: bytes) -> Answer:
        return Answer(400, {"message": SCRIPT_REASON})


def user(uid: str, score: float) -> tuple[Any, ...]:
    return (uid, f"{uid.strip('<>')}@example.com", f"Name {uid}", "CTO", "c1", score)


FIRST = [user(f"u{i}", 20) for i in range(1, 6)] + [user(SCRIPT_USER, 20)]
SECOND = [user("u1", 5)] + [user(f"u{i}", 20) for i in range(2, 7)] + [user(SCRIPT_USER, 20)]
THIRD = [user("u1", 5), user("u2", 5)] + [user(f"u{i}", 20) for i in range(3, 7)] \
    + [user(SCRIPT_USER, 20)]
# Members after each run of high_scorers, and (entered, exited) per run.
MEMBERS = [6, 6, 5]
CHURN = [(6, 0), (1, 1), (0, 1)]


@dataclass
class UIProject:
    path: Path
    warehouse: Path
    state_url: str

    @property
    def config(self) -> Config:
        return load_config(self.path)


def build_project(tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
                  rejecting_url: str) -> UIProject:
    warehouse = tmp_path / "warehouse.db"
    make_warehouse(warehouse, users=FIRST)
    path = write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {
            "file": {"type": "jsonl", "path": "out/identify.jsonl"},
            "picky": {"type": "segment", "write_key": "wk", "base_url": rejecting_url,
                      "timeout": 2, "max_retries": 0},
        },
        "audiences": [
            {"name": SCRIPT_NAME, "key": "high_scorers", "source": "w",
             "destinations": ["file", "picky"],
             "query": "SELECT id AS user_id, email, name FROM users WHERE score > 10"},
            {"name": "Broken", "source": "w", "destinations": ["file"],
             "query": f'SELECT user_id FROM "{SCRIPT_TABLE}"'},
        ],
        "computed_traits": [{
            "name": "Score", "source": "w", "destinations": ["file"],
            "query": "SELECT id AS user_id, score AS value FROM users",
        }],
    })
    project = UIProject(path, warehouse, state_url)
    for users in (FIRST, SECOND, THIRD):
        set_users(warehouse, users)
        code, _out, err = cli(capsys, "--config", str(path), "sync")
        assert code == 1, err  # the broken audience fails, picky rejects: exit 1 each time
    return project


@contextmanager
def built_project(tmp_path: Path, state_url: str,
                  capsys: pytest.CaptureFixture[str]) -> Iterator[UIProject]:
    """The project after its three syncs (each test module's `ui_project` fixture)."""
    with Rejecting().running() as rejecting:
        yield build_project(tmp_path, state_url, capsys, rejecting.url)


@contextmanager
def serving(project: UIProject, token: str | None = None) -> Iterator[str]:
    """The dashboard on an ephemeral loopback port, in a thread; yields its base URL."""
    config = project.config
    store = Store(config.state_db)
    server = UIServer(Dashboard(store, config, token), "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        store.dispose()


def request(url: str, *, headers: dict[str, str] | None = None, data: bytes | None = None,
            ) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers), redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with opener.open(req, timeout=10) as response:
            return int(response.status), response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(), dict(exc.headers)
