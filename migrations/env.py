"""Alembic environment: runs on the connection that audience_sync.state.store hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from audience_sync.state.schema import metadata

# Serialises concurrent upgrades of one PostgreSQL database (several daemons starting at once).
_PG_LOCK = 0x617564_73796E63  # "aud" "sync"


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        from sqlalchemy import create_engine

        url = context.config.get_main_option("sqlalchemy.url")
        assert url, "set sqlalchemy.url or pass a connection"
        with create_engine(url).connect() as conn:
            _migrate(conn)
            conn.commit()
        return
    _migrate(connection)


def _migrate(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=False,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
        context.run_migrations()


run()
