"""`check` and `sync --dry-run` write nothing to the state database: without a current schema
they say what `db upgrade` would do, and stop (check: exit 1, a problem among the others it
reports; a dry run: exit 2, one line), creating no SQLite file and migrating nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import inspect

from audience_sync.state.store import Store, migrations_dir
from tests.helpers import cli, make_warehouse, write_config


def _config(tmp_path: Path, state_url: str) -> Path:
    warehouse = tmp_path / "warehouse.db"
    make_warehouse(warehouse, [("u1", None, None, None, None, 50.0)])
    return write_config(tmp_path / "config.yaml", {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{warehouse}"}},
        "destinations": {"file": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}},
        "audiences": [{"name": "All", "source": "w", "destinations": ["file"],
                       "query": "SELECT id AS user_id FROM users"}],
    })


def _tables(state_url: str) -> list[str]:
    store = Store(state_url)
    try:
        return sorted(inspect(store.engine).get_table_names())
    finally:
        store.dispose()


def _state_url(state_url: str, tmp_path: Path) -> str:
    """SQLite in a folder that does not exist yet: neither may be created."""
    if state_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    return state_url


def test_check_and_dry_run_do_not_create_the_state_database(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = _state_url(state_url, tmp_path)
    config = _config(tmp_path, url)
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 1, out + err
    assert "state_db: FAILED: state database at " in out
    assert "is not initialised: run `audience-sync db upgrade`" in out
    code, out, err = cli(capsys, "--config", str(config), "sync", "--dry-run")
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and "is not initialised: run `audience-sync db " \
        "upgrade`" in err
    if url.startswith("sqlite"):
        assert not (tmp_path / "state").exists()
    else:
        assert _tables(url) == []


def _upgrade_to(state_url: str, revision: str) -> None:
    store = Store(state_url)
    with store.engine.connect() as conn:
        alembic = AlembicConfig()
        alembic.set_main_option("script_location", str(migrations_dir()))
        alembic.attributes["connection"] = conn
        command.upgrade(alembic, revision)
        conn.commit()
    store.dispose()


def _revision(state_url: str, *, head: bool = False) -> str | None:
    store = Store(state_url)
    try:
        return store.head_revision() if head else store.current_revision()
    finally:
        store.dispose()


def test_check_and_dry_run_do_not_migrate_an_old_schema(
        state_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, state_url)
    _upgrade_to(state_url, "0005")
    head = _revision(state_url, head=True)
    expected = f"is at revision 0005, head is {head}: run `audience-sync db upgrade`"
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 1 and expected in out, out + err
    code, out, err = cli(capsys, "--config", str(config), "sync", "--dry-run")
    assert code == 2 and expected in err, out + err
    assert _revision(state_url) == "0005"
    # After `db upgrade` both go ahead, still writing nothing.
    assert cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, out, err = cli(capsys, "--config", str(config), "check")
    assert code == 0 and "state_db: ok" in out, out + err
    code, out, err = cli(capsys, "--config", str(config), "sync", "--dry-run")
    assert code == 0 and "all: initial plan" in out, out + err
