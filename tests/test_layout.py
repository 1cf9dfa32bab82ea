"""The layout holds: only audience_sync/state/ speaks SQL to the state database.

Outside state/ (and sources.py and compiler.py, which read the source databases, and
migrations/), no module
imports SQLAlchemy's SQL constructs or the state schema. Allowed there, and why:
- `sqlalchemy.engine.make_url` / `URL`: parsing a database URL (config validation, masking)
  is not SQL; config.py checks state_db and source URLs with SQLAlchemy's own parser, so what
  it accepts is what the engine will accept;
- `sqlalchemy.exc`: the exceptions that parser raises.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "audience_sync"
ALLOWED_OUTSIDE_STATE = {"sqlalchemy.engine": {"make_url", "URL"},
                         "sqlalchemy.exc": None}  # None: any name
EXEMPT = {PACKAGE / "sources.py", PACKAGE / "compiler.py"}


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None for `import module`, line) of every import in the file."""
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return found


def _violations(path: Path) -> list[str]:
    bad: list[str] = []
    where = path.relative_to(PACKAGE.parent) if PACKAGE in path.parents else path.name
    for module, name, line in _imports(path):
        full = f"{module}.{name}" if name else module
        if full.startswith("audience_sync.state.schema") or (
                module == "audience_sync.state" and name == "schema"):
            bad.append(f"{where}:{line}: imports the state schema ({full})")
        elif module == "sqlalchemy" or module.startswith("sqlalchemy."):
            allowed = ALLOWED_OUTSIDE_STATE.get(module, set())
            if allowed is not None and (name is None or name not in allowed):
                bad.append(f"{where}:{line}: imports SQLAlchemy's {full}")
    return bad


def test_only_the_state_package_imports_sql_constructs_or_the_schema() -> None:
    outside = [p for p in PACKAGE.rglob("*.py")
               if PACKAGE / "state" not in p.parents and p not in EXEMPT]
    assert len(outside) > 20  # the scan sees the package
    violations = [v for path in sorted(outside) for v in _violations(path)]
    assert violations == []


def test_the_layout_scan_catches_sql_imports(tmp_path: Path) -> None:
    """The scan itself: each kind of forbidden import is reported, the allowed ones are not."""
    sample = tmp_path / "probe.py"
    sample.write_text(
        "from sqlalchemy import select, text\n"
        "import sqlalchemy\n"
        "from sqlalchemy.sql import func\n"
        "from audience_sync.state import schema as t\n"
        "from audience_sync.state.schema import deliveries\n"
        "from sqlalchemy.engine import make_url\n"
        "from sqlalchemy.exc import ArgumentError\n")
    found = _violations(sample)
    assert len(found) == 6, found
