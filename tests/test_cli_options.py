"""Options every command takes: --log-format and -v after the command too, one timestamp
format, --version."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from audience_sync import __version__
from audience_sync.cli import hoist_global_options
from tests.daemon_harness import AUDIENCE_SYNC
from tests.helpers import write_config

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AUDIENCE_SYNC, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_global_options_after_the_command_are_hoisted() -> None:
    assert hoist_global_options(["sync", "--log-format", "json", "-v", "a"]) == [
        "--log-format", "json", "-v", "sync", "a"]
    assert hoist_global_options(["run", "--log-format=json"]) == ["--log-format=json", "run"]
    assert hoist_global_options(["members", "--", "-v"]) == ["members", "--", "-v"]


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_format_json_on_any_command_with_one_timestamp_format(
        tmp_path: Path, where: str) -> None:
    config = write_config(tmp_path / "config.yaml", {
        "state_db": f"sqlite:///{tmp_path / 'state.db'}",
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'state.db'}"}},
        "destinations": {"f": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}},
        "audiences": [{"name": "Ones", "source": "w", "query": "SELECT 'u1' AS user_id",
                       "destinations": ["f"]}],
    })
    options = ["--log-format", "json"]
    args = (["-c", str(config), *options, "sync"] if where == "before"
            else ["-c", str(config), "sync", *options])
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert records, done.stderr
    assert all(ISO_MS_Z.match(r["time"]) for r in records), records
    plain = _cli("-c", str(config), "sync", "-v")
    assert plain.returncode == 0, plain.stderr
    stamps = [line.split(" ", 1)[0] for line in plain.stderr.splitlines() if line.strip()]
    assert stamps and all(ISO_MS_Z.match(s) for s in stamps), plain.stderr


def test_version_prints_the_version() -> None:
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"audience-sync {__version__}"


def test_unknown_log_format_is_a_usage_error() -> None:
    done = _cli("--log-format", "xml", "status")
    assert done.returncode == 2
    assert "--log-format" in done.stderr and "Traceback" not in done.stderr
