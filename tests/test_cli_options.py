"""Options every command takes: --log-format and -v after the command too, one timestamp
format, --version."""

from __future__ import annotations

import json
import re
import subprocess
import sys
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


HEAVY = ("sqlalchemy", "alembic", "httpx", "psycopg")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sync", "--help"],
                                  ["run", "--help"], ["db", "--help"]])
def test_help_and_version_import_no_database_or_http_library(args: list[str]) -> None:
    """Start-up: commands import what they use; help and version use none of these."""
    code = ("import sys\nfrom audience_sync.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as exc:\n    assert exc.code == 0\n"
            f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
            "print('LOADED', loaded)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LOADED []", done.stdout


def test_cli_lease_ttl_default_is_the_leases_default() -> None:
    from audience_sync.cli.daemon import DEFAULT_LEASE_TTL
    from audience_sync.config import parse_duration
    from audience_sync.leases import DEFAULT_TTL

    assert parse_duration(DEFAULT_LEASE_TTL) == DEFAULT_TTL
