"""Config and warehouse for the delivery tests: one audience and one trait, three destinations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import make_warehouse, write_config

# Distinctive so a test can grep every output for them.
TENANT_TOKEN = "tenant-SECRET-4f1d9a"
API_TOKEN = "apitoken-SECRET-8c2e7b"
WRITE_KEY = "writekey-SECRET-3b6a0c"
SECRETS = (TENANT_TOKEN, API_TOKEN, WRITE_KEY)

AUDIENCE_QUERY = ("SELECT id AS user_id, email, name, title, company_id FROM users "
                  "WHERE score > 10")
TRAIT_QUERY = "SELECT id AS user_id, email, score AS value FROM users WHERE score IS NOT NULL"

# Fast retries for tests: the policy is the same, the clock constants are small.
FAST: dict[str, Any] = {"timeout": 0.5, "max_retries": 8, "backoff_base": 0.002,
                        "backoff_max": 0.05, "retry_later": 0}

USERS = [
    ("u1", "ann@example.com", "Ann", "CTO", "c1", 50.0),
    ("u2", "bob@example.com", "Bob", None, None, 20.0),
    ("u3", None, None, None, "c3", 15.0),
    ("u4", "dan@example.com", "Dan", "CEO", "c1", 1.0),
]


def set_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANHAT_TENANT_TOKEN", TENANT_TOKEN)
    monkeypatch.setenv("PLANHAT_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("SEGMENT_WRITE_KEY", WRITE_KEY)


def delivery_config(tmp_path: Path, state_url: str, *, planhat: str | None = None,
                    planhat_api: str | None = None, segment: str | None = None,
                    users: list[tuple[Any, ...]] | None = None, trait: bool = True,
                    overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write config.yaml (and the warehouse) naming the destinations whose URL is given."""
    settings = overrides or {}
    warehouse = tmp_path / "warehouse.db"
    if not warehouse.exists():
        make_warehouse(warehouse, USERS if users is None else users)
    destinations: dict[str, Any] = {}
    if planhat:
        destinations["planhat"] = {"type": "planhat", "tenant_token": "${PLANHAT_TENANT_TOKEN}",
                                   "base_url": planhat, "rate_limit": "2000/s", **FAST,
                                   **settings.get("planhat", {})}
    if planhat_api:
        destinations["planhat_api"] = {"type": "planhat", "mode": "api",
                                       "api_token": "${PLANHAT_API_TOKEN}",
                                       "base_url": planhat_api, "rate_limit": "2000/s", **FAST,
                                       **settings.get("planhat_api", {})}
    if segment:
        destinations["segment"] = {"type": "segment", "write_key": "${SEGMENT_WRITE_KEY}",
                                   "base_url": segment, "rate_limit": "2000/s", **FAST,
                                   **settings.get("segment", {})}
    names = list(destinations)
    document: dict[str, Any] = {
        "state_db": state_url,
        "sources": {"warehouse": {"url": f"sqlite:///{warehouse}"}},
        "destinations": destinations,
        "audiences": [{"name": "Power Users", "source": "warehouse", "query": AUDIENCE_QUERY,
                       "destinations": names}],
    }
    if trait:
        document["computed_traits"] = [{"name": "Score", "source": "warehouse",
                                        "query": TRAIT_QUERY, "destinations": names}]
    return write_config(tmp_path / "config.yaml", document)
