"""Small helpers for tests: config files, a warehouse to query, the CLI in-process."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from audience_sync.cli import main


def write_config(path: Path, document: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


def make_warehouse(path: Path, users: Iterable[tuple[Any, ...]] = (),
                   tracks: Iterable[tuple[Any, ...]] = ()) -> str:
    """A SQLite source in Segment's warehouse schema; returns its URL."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE IF NOT EXISTS users (id TEXT, email TEXT, name TEXT, title TEXT,
                                          company_id TEXT, score REAL);
        CREATE TABLE IF NOT EXISTS tracks (user_id TEXT, event TEXT, timestamp TEXT);
    """)
    db.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", list(users))
    db.executemany("INSERT INTO tracks VALUES (?, ?, ?)", list(tracks))
    db.commit()
    db.close()
    return f"sqlite:///{path}"


def set_users(path: Path, users: Sequence[tuple[Any, ...]]) -> None:
    """Replace the users table's rows."""
    db = sqlite3.connect(path)
    db.execute("DELETE FROM users")
    db.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)", list(users))
    db.commit()
    db.close()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    out, err = capsys.readouterr()
    return code, out, err
