"""Fixtures shared by every layer of tests.

`state_url` is THE parametrized fixture: every store test runs on SQLite and on PostgreSQL.
PostgreSQL comes from AUDIENCE_SYNC_TEST_PG_URL; each test gets a schema of its own. When
the variable is set (or CI=true) and PostgreSQL cannot be reached, the tests fail, not skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.delivery_setup import API_TOKEN, TENANT_TOKEN, WRITE_KEY
from tests.fakes import FakePlanhat, FakeSegment

PG_URL = os.environ.get("AUDIENCE_SYNC_TEST_PG_URL")


def _pg_schema_url(base: str, schema: str) -> str:
    url = make_url(base)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("CI is set but AUDIENCE_SYNC_TEST_PG_URL is not: PostgreSQL tests must run")
        pytest.skip("AUDIENCE_SYNC_TEST_PG_URL is not set")
    url = make_url(PG_URL)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    rendered = url.render_as_string(hide_password=False)
    engine = create_engine(rendered)
    with engine.connect() as conn:  # fails (not skips) when PostgreSQL is down
        conn.execute(text("SELECT 1"))
    engine.dispose()
    return rendered


def new_pg_schema(admin_url: str) -> tuple[str, str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    return schema, _pg_schema_url(admin_url, schema)


def drop_pg_schema(admin_url: str, schema: str) -> None:
    engine = create_engine(admin_url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty state database URL: SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    schema, url = new_pg_schema(admin)
    try:
        yield url
    finally:
        drop_pg_schema(admin, schema)


@pytest.fixture
def planhat() -> Iterator[FakePlanhat]:
    """A fake Planhat (both modes) taking the delivery tests' tokens; a module needing another
    kind (strict fields, a trickle) overrides it."""
    with FakePlanhat(TENANT_TOKEN, API_TOKEN).running() as fake:
        assert isinstance(fake, FakePlanhat)
        yield fake


@pytest.fixture
def segment() -> Iterator[FakeSegment]:
    """A fake Segment tracking API taking the delivery tests' write key."""
    with FakeSegment(WRITE_KEY).running() as fake:
        assert isinstance(fake, FakeSegment)
        yield fake
