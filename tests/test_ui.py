"""The dashboard's pages and /api JSON over a store with real runs, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import select, update

from audience_sync.config import load_config
from audience_sync.runner import run_computation
from audience_sync.state import dashboard
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.helpers import cli, make_warehouse, set_users, write_config
from tests.ui_setup import (
    CHURN,
    MEMBERS,
    SCRIPT_NAME,
    SCRIPT_REASON,
    SCRIPT_TABLE,
    SCRIPT_USER,
    UIProject,
    built_project,
    request,
    serving,
)


@pytest.fixture
def ui_project(tmp_path: Path, state_url: str,
               capsys: pytest.CaptureFixture[str]) -> Iterator[UIProject]:
    with built_project(tmp_path, state_url, capsys) as project:
        yield project


def cli_json(capsys: pytest.CaptureFixture[str], project: UIProject, *args: str) -> object:
    code, out, err = cli(capsys, "--config", str(project.path), *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_pages_show_the_figures_of_the_runs(ui_project: UIProject) -> None:
    with serving(ui_project) as base:
        status, index, headers = request(base + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        rows = dict(re.findall(r'<tr data-key="([^"]+)">(.*?)</tr>', index, re.S))
        assert set(rows) == {"high_scorers", "broken", "score"}
        assert '<td class="n members">5</td>' in rows["high_scorers"]
        assert "failed deliveries" in rows["high_scorers"] and "picky: 5" not in rows["broken"]
        assert "failing" in rows["broken"]
        # The sparkline: one vertex per succeeded run.
        spark = re.search(r'class="sparkline".*?points="([^"]*)"', rows["high_scorers"], re.S)
        assert spark is not None and len(spark.group(1).split()) == len(MEMBERS)

        status, page, _ = request(base + "/audiences/high_scorers")
        assert status == 200
        assert '<b id="members">5</b>' in page
        chart = re.search(r'<svg id="members-chart".*?</svg>', page, re.S)
        assert chart is not None
        points = re.findall(r'<circle class="pt"[^>]*><title>run #\d+: ([\d,]+) members',
                            chart.group(0))
        assert [int(p) for p in points] == MEMBERS  # one point per run, oldest first
        bars = re.search(r'<svg id="churn-chart".*?</svg>', page, re.S)
        assert bars is not None
        entered = re.findall(r'class="entered".*?<title>run #\d+: \+(\d+)', bars.group(0))
        exited = re.findall(r'class="exited".*?<title>run #\d+: -(\d+)', bars.group(0))
        assert [int(n) for n in entered] == [e for e, _ in CHURN if e]
        assert [int(n) for n in exited] == [x for _, x in CHURN if x]
        runs_table = re.search(r'<table id="runs">.*?</table>', page, re.S)
        assert runs_table is not None and runs_table.group(0).count("<tr><td>#") == 3
        failed = re.search(r'<table id="failed">.*?</table>', page, re.S)
        assert failed is not None and "rejected" in failed.group(0)
        deliveries = re.search(r'<table id="deliveries">.*?</table>', page, re.S)
        assert deliveries is not None
        # picky refused all 6 initial calls, then u1/u6 and u2's changes: 6 + 2 + 1.
        assert re.search(r"<td>picky</td><td class=\"n\">0</td><td class=\"n status-failed\">9"
                         "</td>", deliveries.group(0))

        status, user_page, _ = request(base + "/audiences/high_scorers/users/u1")
        assert status == 200
        timeline = re.search(r'<ol id="timeline".*?</ol>', user_page, re.S)
        assert timeline is not None
        assert re.findall(r'class="change-(\w+)"', timeline.group(0)) == ["entered", "exited"]
        assert "Not a member now." in user_page

        status, trait_page, _ = request(base + "/audiences/score/users/u1")
        assert status == 200 and "Value now: <code>5</code>" in trait_page


def test_api_has_the_cli_json_shapes(ui_project: UIProject,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    status_doc = cli_json(capsys, ui_project, "status")
    runs_doc = cli_json(capsys, ui_project, "runs", "high_scorers")
    history_doc = cli_json(capsys, ui_project, "history", "high_scorers", "--user", "u1")
    failed_doc = cli_json(capsys, ui_project, "deliveries", "high_scorers", "--failed")
    with serving(ui_project) as base:
        code, body, headers = request(base + "/api/status")
        assert code == 200 and headers["Content-Type"] == "application/json"
        api_status = json.loads(body)
        for item in api_status["computations"]:
            assert item["initial_progress"] is None
        assert api_status == status_doc

        api_audience = json.loads(request(base + "/api/audiences/high_scorers")[1])
        assert api_audience["runs"] == runs_doc
        assert api_audience["audience"]["members"] == 5
        assert api_audience["deliveries"]["by_destination"]["picky"] == {"pending": 0,
                                                                        "failed": 9}
        assert isinstance(failed_doc, list)
        newest_failed = sorted(failed_doc, key=lambda d: -d["id"])
        assert [{k: v for k, v in d.items() if k != "sent_at"}
                for d in api_audience["recent_failed"]] == newest_failed

        api_user = json.loads(request(base + "/api/audiences/high_scorers/users/u1")[1])
        assert api_user["history"] == history_doc
        assert [d["value"] for d in api_user["deliveries"] if d["destination"] == "file"] == \
            [False, True]


def test_unknown_audience_or_user_is_404(ui_project: UIProject) -> None:
    with serving(ui_project) as base:
        for path in ("/audiences/nope", "/audiences/high_scorers/users/nobody",
                     "/audiences/nope/users/u1", "/api/audiences/nope",
                     "/api/audiences/high_scorers/users/nobody", "/elsewhere"):
            code, body, _ = request(base + path)
            assert code == 404, path
            assert "u3@example.com" not in body


def test_user_data_with_script_comes_out_escaped(ui_project: UIProject) -> None:
    user_path = "/audiences/high_scorers/users/" + quote(SCRIPT_USER, safe="")
    with serving(ui_project) as base:
        pages = {path: request(base + path) for path in (
            "/", "/audiences/high_scorers", "/audiences/broken", user_path,
            "/audiences/nope" + quote(SCRIPT_USER, safe=""))}
    for path, (code, body, _) in pages.items():
        assert code in (200, 404), path
        assert "<script" not in body.lower(), path
    assert "High &lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt; Scorers" in pages["/"][1]
    assert "&lt;script&gt;alert(&#39;reason&#39;)" in pages["/audiences/high_scorers"][1]
    assert "&lt;script&gt;alert(&#39;table&#39;)" in pages["/audiences/broken"][1]
    assert '<span id="user-id">&lt;script&gt;alert(&#39;user&#39;)&lt;/script&gt;</span>' \
        in pages[user_path][1]
    assert SCRIPT_NAME and SCRIPT_REASON and SCRIPT_TABLE  # the raw texts the store holds


def test_runs_table_pages_by_run_id(ui_project: UIProject) -> None:
    store = Store(ui_project.state_url)
    now = datetime.now(UTC)
    try:
        with store.read() as conn:
            first = dashboard.audience(conn, "high_scorers", now)
            assert first is not None and len(first.runs) == 3 and first.older_than is None
            newest = first.runs[0].id
            older = dashboard.audience(conn, "high_scorers", now, older_than=newest)
        assert older is not None
        assert [r.id for r in older.runs] == [r.id for r in first.runs[1:]]
        assert [r.members for r in older.series] == MEMBERS  # the chart does not page
    finally:
        store.dispose()


def test_initial_sync_progress_counts_sent_and_rate(tmp_path: Path, state_url: str) -> None:
    make_warehouse(tmp_path / "w.db", users=[(f"u{i}", None, None, None, None, 20)
                                            for i in range(6)])
    config_path = write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'w.db'}"}},
        "destinations": {"file": {"type": "jsonl", "path": "o.jsonl"}},
        "audiences": [{"name": "All", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id FROM users"}],
    })
    config = load_config(config_path)
    store = Store(config.state_db)
    store.upgrade()
    now = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
    store.register(config.computations, now)
    try:
        result = run_computation(store, config, config.computations[0], clock=lambda: now)
        assert result.queued == 6
        d = t.deliveries
        with store.write() as conn:
            ids = conn.execute(select(d.c.id).order_by(d.c.id).limit(2)).scalars().all()
            conn.execute(update(d).where(d.c.id.in_(ids)).values(
                status="sent", sent_at=now + timedelta(seconds=30)))
        with store.read() as conn:
            (summary,) = dashboard.overview(conn, now + timedelta(seconds=90))
        progress = summary.progress
        assert progress is not None
        assert (progress.total, progress.done, progress.pending) == (6, 2, 4)
        # 2 sent in the last minute (the first 60 s before now): 2/60 per second, 4 to go.
        assert progress.rate == pytest.approx(2 / 60)
        assert progress.eta_seconds == pytest.approx(120)
    finally:
        store.dispose()


def test_held_and_orphaned_audiences_are_marked(tmp_path: Path, state_url: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    warehouse = tmp_path / "w.db"
    make_warehouse(warehouse, users=[(f"u{i}", None, None, None, None, 20) for i in range(6)])
    audience = {"source": "w", "destinations": ["file"],
                "query": "SELECT id AS user_id FROM users WHERE score > 10"}
    document = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": "o.jsonl"}},
        "audiences": [{"name": "Kept", **audience}, {"name": "Dropped", **audience}],
    }
    path = write_config(tmp_path / "config.yaml", document)
    assert cli(capsys, "--config", str(path), "sync")[0] == 0
    set_users(warehouse, [("u0", None, None, None, None, 20)])
    code, _, err = cli(capsys, "--config", str(path), "sync", "kept")
    assert code != 0 and "held" in err  # 5 of 6 would leave: held by the removal guard
    document["audiences"] = [{"name": "Kept", **audience}]
    write_config(path, document)
    project = UIProject(path, warehouse, state_url)
    with serving(project) as base:
        index = request(base + "/")[1]
        rows = dict(re.findall(r'<tr data-key="([^"]+)">(.*?)</tr>', index, re.S))
        assert '<span class="mark held">held</span>' in rows["kept"]
        assert '<span class="mark orphaned">orphaned</span>' in rows["dropped"]
        assert "orphaned" not in rows["kept"] and "held" not in rows["dropped"]
        page = request(base + "/audiences/kept")[1]
        assert '<td class="status-held">held</td>' in page
        status = json.loads(request(base + "/api/status")[1])
        assert {c["key"]: c["orphaned"] for c in status["computations"]} == {
            "kept": False, "dropped": True}


def test_state_database_down_is_a_503_page(tmp_path: Path) -> None:
    make_warehouse(tmp_path / "w.db")
    down = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"  # nothing listens on port 1
    path = write_config(tmp_path / "config.yaml", {
        "state_db": down,
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'w.db'}"}},
        "destinations": {"file": {"type": "jsonl", "path": "o.jsonl"}},
        "audiences": [{"name": "A", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id FROM users"}],
    })
    with serving(UIProject(path, tmp_path / "w.db", down)) as base:
        code, body, _ = request(base + "/")
        assert code == 503 and "State database unavailable" in body
        code, body, _ = request(base + "/api/status")
        assert code == 503 and "did not answer" in json.loads(body)["error"]
