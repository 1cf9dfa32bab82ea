"""The state store on SQLite and PostgreSQL: migrations equal the metadata, upgrades are safe."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from audience_sync.config import load_config
from audience_sync.state.schema import metadata
from audience_sync.state.store import Store
from tests.helpers import write_config


def test_upgrade_head_equals_metadata(state_url: str) -> None:
    store = Store(state_url)
    assert store.current_revision() is None
    assert store.upgrade() is True
    assert store.current_revision() == store.head_revision()
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == [], diff
    assert {"computations", "runs", "members", "membership_history", "trait_history",
            "deliveries"} <= tables
    assert store.upgrade() is False  # idempotent
    store.dispose()


def test_concurrent_upgrades_are_safe(state_url: str) -> None:
    """Several processes starting at once on an empty database (alembic is per process)."""
    code = "import sys; from audience_sync.state.store import Store; Store(sys.argv[1]).upgrade()"
    procs = [subprocess.Popen([sys.executable, "-c", code, state_url], stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    store = Store(state_url)
    assert store.current_revision() == store.head_revision()
    store.dispose()


def test_register_and_orphans(state_url: str, tmp_path: Path) -> None:
    doc = {
        "state_db": state_url,
        "sources": {"w": {"url": f"sqlite:///{tmp_path / 'w.db'}"}},
        "destinations": {"f": {"type": "jsonl", "path": "out.jsonl"}},
        "audiences": [{"name": "Alpha Users", "source": "w", "query": "SELECT 1 AS user_id",
                       "destinations": ["f"]}],
    }
    config = load_config(write_config(tmp_path / "config.yaml", doc))
    store = Store(state_url)
    store.upgrade()
    at = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    store.register(config.computations, at)
    store.register(config.computations, at)  # idempotent
    rows = store.computations()
    assert [(r.key, r.initial_state, r.next_due_at) for r in rows] == [
        ("alpha_users", "pending", at)]
    assert rows[0].next_due_at is not None and rows[0].next_due_at.tzinfo is not None
    doc["audiences"][0]["name"] = "Alpha Members"
    renamed = load_config(write_config(tmp_path / "config.yaml", doc))
    store.register(renamed.computations, at)
    assert [r.key for r in store.computations()] == ["alpha_users", "alpha_members"]
    store.dispose()


def test_head_revision_is_the_newest_migration() -> None:
    """HEAD_REVISION lets an up-to-date store skip alembic: it must name the newest migration."""
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

    from audience_sync.state.store import HEAD_REVISION, migrations_dir

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def test_store_at_head_opens_without_alembic(state_url: str) -> None:
    """One SELECT on alembic_version, and alembic is not even imported, when nothing is due."""
    store = Store(state_url)
    store.upgrade()
    store.dispose()
    code = ("import sys; from audience_sync.state.store import Store; s = Store(sys.argv[1]); "
            "assert s.upgrade() is False; assert s.current_revision() == s.head_revision(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")
    out = subprocess.run([sys.executable, "-c", code, state_url], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
