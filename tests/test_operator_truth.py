"""What the operator is told is true: summaries from the run record, exit codes (0 done,
1 failed, 2 usage, 3 held), dry runs per destination, `check` proving every definition,
--wait on a held lease, retry re-queuing only, progress lines with sent/total and an ETA."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from sqlalchemy import update

from audience_sync.leases import try_acquire
from audience_sync.state import queries
from audience_sync.state import schema as t
from audience_sync.state.store import Store
from tests.delivery_setup import TENANT_TOKEN, delivery_config, set_env
from tests.fakes import FakePlanhat
from tests.helpers import cli, make_warehouse, set_users, write_config

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
QUERY = "SELECT id AS user_id, email FROM users WHERE score > 10"


def user(uid: str, score: float = 20) -> tuple[Any, ...]:
    return (uid, f"{uid}@example.com", f"Name {uid}", "CTO", "c1", score)


def _config(tmp_path: Path, state_url: str, *, destinations: int = 1,
            audiences: list[dict[str, Any]] | None = None,
            traits: list[dict[str, Any]] | None = None) -> Path:
    warehouse = tmp_path / "warehouse.db"
    if not warehouse.exists():
        make_warehouse(warehouse, users=[user(f"u{i}") for i in range(1, 11)])
    names = [f"file{i}" for i in range(1, destinations + 1)]
    return write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {name: {"type": "jsonl", "path": f"out/{name}.jsonl"}
                         for name in names},
        "audiences": audiences if audiences is not None else [
            {"name": "Fans", "source": "w", "destinations": names, "query": QUERY}],
        **({"computed_traits": traits} if traits else {}),
    })


def _sync(capsys: pytest.CaptureFixture[str], config: Path,
          *args: str) -> tuple[int, dict[str, Any], str]:
    code, out, err = cli(capsys, "--config", str(config), "sync", "--json", *args)
    return code, json.loads(out), err


def _record(state_url: str, run_id: int) -> dict[str, Any]:
    store = Store(state_url)
    record = queries.run_record(store, run_id)
    store.dispose()
    assert record is not None
    return record.as_dict()


def test_sync_exit_codes_0_done_1_failed_2_usage_3_held(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url)
    with freeze_time(T0):
        code, doc, _ = _sync(capsys, config)
    assert (code, doc["exit_code"], doc["ok"], doc["schema_version"]) == (0, 0, True, 1)
    assert doc["deliveries"]["file1"] == {
        "sent": 10, "failed": 0, "deferred": 0, "requests": 0, "retries": 0, "throttled": 0,
        "error": None, "waiting": 0, "reason": None, "paused": False}
    # Every member leaving is held by the guard: 3, nothing failed.
    set_users(tmp_path / "warehouse.db", [])
    with freeze_time(T0 + timedelta(hours=1)):
        code, doc, _ = _sync(capsys, config)
    assert (code, doc["exit_code"], doc["runs"][0]["status"]) == (3, 3, "held")
    # The source losing its table fails the run: 1.
    (tmp_path / "warehouse.db").unlink()
    make_warehouse(tmp_path / "other.db")
    config.write_text(config.read_text().replace("warehouse.db", "other.db")
                      .replace("FROM users", "FROM no_such_table"))
    with freeze_time(T0 + timedelta(hours=2)):
        code, doc, _ = _sync(capsys, config)
    assert (code, doc["runs"][0]["status"]) == (1, "failed")
    # An unknown audience is bad usage: 2, one line, a suggestion.
    code, out, err = cli(capsys, "--config", str(config), "sync", "fnas")
    assert code == 2 and out == ""
    assert err.strip() == ("audience-sync: error: unknown audience 'fnas' (did you mean "
                           "'fans'?; known: fans)")
    code, _, err = cli(capsys, "--config", str(config), "sync", "--wait", "soon")
    assert code == 2 and "--wait" in err


def test_held_run_summary_equals_its_run_record(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url, destinations=2)
    with freeze_time(T0):
        assert _sync(capsys, config)[0] == 0
    set_users(tmp_path / "warehouse.db", [user("u1")])  # 9 of 10 leave: held
    with freeze_time(T0 + timedelta(hours=1)):
        code, doc, _ = _sync(capsys, config)
        _, out, _ = cli(capsys, "--config", str(config), "sync")
    assert code == 3
    run = doc["runs"][0]
    record = _record(state_url, run["run_id"])
    assert {k: run[k] for k in record if k != "skipped"} == \
        {k: v for k, v in record.items() if k != "skipped"}
    assert run["queued"] == record["queued"] == 0 and run["per_destination"] == {}
    # The printed line says what the record says: nothing queued.
    line = out.splitlines()[0]
    assert line.startswith("fans: incremental held (run #") and line.endswith(
        f"{record['members']} members (+{record['entered']} -{record['exited']} "
        f"~{record['changed']}), 0 queued")


def test_dry_run_counts_what_a_forced_run_would_send_per_destination(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url, destinations=3)
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, doc, _ = _sync(capsys, config, "--dry-run")
    assert code == 0
    run = doc["runs"][0]
    assert run["per_destination"] == {"file1": 10, "file2": 10, "file3": 10}
    assert run["queued"] == 30 and run["run_id"] is None and run["clock"] is None
    with freeze_time(T0):
        assert _sync(capsys, config)[0] == 0
    set_users(tmp_path / "warehouse.db", [user("u1")])
    with freeze_time(T0 + timedelta(hours=1)):
        code, out, _ = cli(capsys, "--config", str(config), "sync", "--dry-run")
    # Held by the guard: what a forced run would send, to each destination.
    assert code == 3
    assert out.splitlines()[0] == (
        "fans: incremental plan, held by the guard, 1 members (+0 -9 ~0), a forced run would "
        "send 9 to each of file1, file2, file3 (27 deliveries)")


def test_failed_run_reports_the_previous_member_count(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url)
    with freeze_time(T0):
        assert _sync(capsys, config)[0] == 0
    config.write_text(config.read_text().replace("FROM users", "FROM gone"))
    with freeze_time(T0 + timedelta(hours=1)):
        code, doc, _ = _sync(capsys, config)
        _, out, _ = cli(capsys, "--config", str(config), "sync")
    run = doc["runs"][0]
    assert code == 1 and run["status"] == "failed"
    assert run["members"] == _record(state_url, run["run_id"])["members"] == 10
    assert ", 10 members (+0 -0 ~0), 0 queued" in out.splitlines()[0]


def test_check_fails_for_a_missing_table_a_query_without_user_id_a_trait_without_value(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url, audiences=[
        {"name": "Fine", "source": "w", "destinations": ["file1"], "query": QUERY},
        {"name": "No Table", "source": "w", "destinations": ["file1"],
         "query": "SELECT id AS user_id FROM missing_table"},
        {"name": "No Id", "source": "w", "destinations": ["file1"],
         "query": "SELECT id, email FROM users"},
    ], traits=[
        {"name": "No Value", "source": "w", "destinations": ["file1"],
         "query": "SELECT id AS user_id, score FROM users"},
        {"name": "Score", "source": "w", "destinations": ["file1"],
         "query": "SELECT id AS user_id, score AS value FROM users;"},
    ])
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 1, out + err
    lines = {line.split(":", 1)[0]: line for line in out.splitlines()}
    assert lines["audiences[0] (fine)"] == "audiences[0] (fine): ok (columns: user_id, email)"
    assert "FAILED" in lines["audiences[1] (no_table)"]
    assert "missing_table" in lines["audiences[1] (no_table)"]
    assert "no user_id column" in lines["audiences[2] (no_id)"]
    assert "value" in lines["computed_traits[0] (no_value)"]
    assert "FAILED" in lines["computed_traits[0] (no_value)"]
    assert lines["computed_traits[1] (score)"].endswith("ok (columns: user_id, value)")
    assert "3 problem(s) found" in out
    code, out, _ = cli(capsys, "--config", str(config), "check", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["schema_version"] == 1 and doc["problems"] == 3
    by_key = {c["key"]: c for c in doc["checks"] if c["key"]}
    assert by_key["fine"]["ok"] and by_key["fine"]["columns"] == ["user_id", "email"]
    assert not by_key["no_table"]["ok"] and by_key["no_table"]["columns"] is None
    assert all(set(c) == {"kind", "name", "ok", "problem", "key", "columns", "note"}
               for c in doc["checks"])


def test_sync_wait_gives_up_after_the_wait_naming_the_holder(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url)
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    store = Store(state_url)
    store.upgrade()
    from audience_sync.config import load_config

    store.register(load_config(config).computations, datetime.now(UTC))
    lease = try_acquire(store, "fans", "daemon:elsewhere:1:abc", ttl=timedelta(minutes=10),
                        at=datetime.now(UTC))
    assert lease is not None
    code, out, err = cli(capsys, "--config", str(config), "sync", "--wait", "1s")
    assert code == 1, out + err
    assert "daemon:elsewhere:1:abc holds the lease" in err
    assert "gave up after waiting 1s" in err
    assert queries.runs(store, key="fans") == []  # nothing ran
    store.dispose()


def test_retry_requeues_without_sending(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url)
    with freeze_time(T0):
        assert _sync(capsys, config)[0] == 0
    out_file = tmp_path / "out" / "file1.jsonl"
    sent_before = out_file.read_text()
    store = Store(state_url)
    with store.write() as conn:  # as if they had failed
        conn.execute(update(t.deliveries).values(status="failed", last_error="HTTP 400"))
    code, out, err = cli(capsys, "--config", str(config), "retry", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["requeued"], doc["drained"], doc["deliveries"]) == (10, False, None)
    assert out_file.read_text() == sent_before  # nothing sent
    counts = queries.delivery_counts(store)
    assert sum(n for (_c, _d, status), n in counts.items() if status == "pending") == 10
    code, out, err = cli(capsys, "--config", str(config), "retry", "--drain")
    assert code == 0 and "re-queued 0" in out  # nothing failed any more
    code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0 and "file1: 10 sent" in out  # the next sync delivers them
    store.dispose()


def test_delivery_progress_lines_carry_sent_total_and_eta(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    set_env(monkeypatch)
    users = [(f"u{i}", f"u{i}@example.com", None, None, None, 50.0) for i in range(30)]
    with FakePlanhat(tenant_token=TENANT_TOKEN, rate=15, burst=1).running() as planhat:
        config = delivery_config(tmp_path, state_url, planhat=planhat.url, users=users,
                                 trait=False, overrides={"planhat": {
                                     "rate_limit": "15/s", "batch_size": 1}})
        code, out, err = cli(capsys, "--config", str(config), "sync")
    assert code == 0, out + err
    lines = [line for line in err.splitlines() if "audience_sync.progress: planhat:" in line]
    # Every ~10% of the 30 deliveries: at least a few lines, each with sent/total, a rate
    # and (until the end) an ETA.
    assert len(lines) >= 3, err
    pattern = re.compile(r"planhat: (\d+)/30 delivered \(\d+%\), [\d,.]+/s"
                         r"(, ETA (\d+ s|\d+ min))?$")
    for line in lines:
        match = pattern.search(line)
        assert match, line
        if int(match.group(1)) < 30:
            assert match.group(2), line
    assert any("ETA" in line for line in lines)


@pytest.mark.parametrize(("seconds", "text"), [
    (0.2, "now"), (-0.4, "now"), (-45, "45 s ago"), (-59.6, "1 min ago"), (-720, "12 min ago"),
    (3600 + 48 * 60, "in 1 h 48 min"), (7200, "in 2 h"), (-86400 * 2 - 3 * 3600, "2 d 3 h ago"),
    (86400, "in 1 d"),
])
def test_relative_times(seconds: float, text: str) -> None:
    from audience_sync.clock import relative

    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert relative(now + timedelta(seconds=seconds), now) == text


def test_table_time_is_utc_to_the_second_with_relative() -> None:
    from audience_sync.clock import table_time

    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert table_time(now - timedelta(minutes=12, seconds=3), now) == \
        "2026-11-30 11:47:57 (12 min ago)"
    assert table_time(None, now) == "-"


# -- log levels, one stream, 80 columns ---------------------------------------------------------

def test_failed_run_logs_error_and_held_run_warning(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url)
    with freeze_time(T0):
        code, _, err = _sync(capsys, config)
    assert code == 0 and " INFO audience_sync.runner: fans: initial run succeeded" in err
    set_users(tmp_path / "warehouse.db", [])
    with freeze_time(T0 + timedelta(hours=1)):
        code, _, err = _sync(capsys, config)
    assert code == 3 and " WARNING audience_sync.runner: fans: incremental run held" in err
    config.write_text(config.read_text().replace("FROM users", "FROM gone"))
    with freeze_time(T0 + timedelta(hours=2)):
        code, _, err = _sync(capsys, config)
    assert code == 1 and " ERROR audience_sync.runner: fans: incremental run failed" in err


def test_a_drain_paused_by_its_slice_logs_info_not_warning(
        tmp_path: Path, state_url: str, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    from audience_sync.config import load_config
    from audience_sync.drain import DrainControl, drain
    from audience_sync.leases import hold_all
    from audience_sync.runner import run_computation

    config_path = _config(tmp_path, state_url)
    config = load_config(config_path)
    store = Store(state_url)
    store.upgrade()
    store.register(config.computations, datetime.now(UTC))
    from contextlib import ExitStack

    with ExitStack() as stack:
        leases = hold_all(stack, store, ["fans"], "test:owner")
        run_computation(store, config, config.computations[0],
                        fencing_token=leases[0].token)
        caplog.clear()
        caplog.set_level(logging.INFO, logger="audience_sync")
        report = drain(store, config, leases,
                       control=DrainControl(reason=lambda: "slice used up; resumes next tick"))
    assert report.destinations["file1"].paused
    paused = [r for r in caplog.records if "drain paused" in r.getMessage()]
    assert [r.levelname for r in paused] == ["INFO"]
    store.dispose()


def _run(*args: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    from tests.daemon_harness import AUDIENCE_SYNC

    return subprocess.run([AUDIENCE_SYNC, *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_one_stream_carries_each_outcome_once(tmp_path: Path, state_url: str) -> None:
    config = _config(tmp_path, state_url)
    done = _run("--config", str(config), "sync")  # stdout and stderr: one pipe
    assert done.returncode == 0, done.stdout
    assert [line for line in done.stdout.splitlines() if "initial" in line and
            "10 members" in line] == [
        line for line in done.stdout.splitlines() if line.startswith("fans: initial")]
    assert done.stdout.count("10 members") == 1, done.stdout
    # -q after the command: no log lines at all, the summary still.
    done = _run("--config", str(config), "sync", "-q")
    assert done.returncode == 0
    assert done.stdout.splitlines()[0].startswith("fans: incremental succeeded")
    assert " INFO " not in done.stdout


def test_status_is_readable_at_80_columns(tmp_path: Path, state_url: str) -> None:
    config = _config(tmp_path, state_url, destinations=2)
    assert _run("--config", str(config), "sync").returncode == 0
    done = _run("--config", str(config), "status", env={"COLUMNS": "80"})
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), "\n" + done.stdout
    text = done.stdout
    assert text.startswith("fans  audience, 10 members, initial sync complete\n")
    assert "initial succeeded +10 -0 ~0, 20" in text and "(in " in text


def test_shell_completion_completes_commands(tmp_path: Path) -> None:
    # Typer's own switch: name the shell instead of detecting it from the parent process
    # (a test runner under a non-shell parent, as CI's, has none to detect).
    shown = _run("--show-completion", "bash",
                 env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert shown.returncode == 0 and "_audience_sync_completion" in shown.stdout
    done = _run(env={"_AUDIENCE_SYNC_COMPLETE": "complete_bash",
                     "COMP_WORDS": "audience-sync res", "COMP_CWORD": "1"}, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.split() == ["resync"]
