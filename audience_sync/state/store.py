"""The state store: engine set-up, migrations, and the queries the CLI reads.

Everything that touches the state database goes through a Store.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    event,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.pool import QueuePool

from audience_sync.config import Computation
from audience_sync.errors import StoreError, describe_db_error
from audience_sync.state import schema as t
from audience_sync.states import InitialState
from audience_sync.urls import mask_url, with_psycopg

SQLITE_BUSY_TIMEOUT_MS = 60_000
# Page cache per connection; bounded so peak memory stays flat as audiences grow.
SQLITE_CACHE_KIB = 32_000
# SQLite connections kept open between transactions. Not one: when the last connection to a
# WAL database closes, SQLite checkpoints and deletes the WAL, and a drain that opened and
# closed a connection per claim spent a third of its time doing that. Not many: each idle
# connection keeps its page cache. Busy threads get extra connections, closed on return.
SQLITE_POOL_SIZE = 2

# The newest migration (migrations/versions). A store already there is opened with one SELECT on
# alembic_version, and alembic, a tenth of a command's start-up, is not even imported;
# test_head_revision_is_the_newest_migration keeps this in step with the migrations.
HEAD_REVISION = "0009"

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig


def migrations_dir() -> Path:
    """Inside the installed package (wheel), or at the repository root (editable checkout)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise StoreError("the migrations folder is missing from this installation")


def create_state_engine(url: str) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, poolclass=QueuePool, pool_size=SQLITE_POOL_SIZE,
                               max_overflow=-1)
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        parsed = with_psycopg(parsed)
        # A drain holds one connection per claim on the wire (its row locks), up to a
        # destination's window plus the claim being loaded, for each destination at once.
        return create_engine(parsed, pool_pre_ping=True, pool_size=4, max_overflow=20)
    raise StoreError(f"unsupported state database {backend!r}: use SQLite or PostgreSQL")


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN and cannot BEGIN IMMEDIATE; take it over
    # (the recipe in SQLAlchemy's SQLite dialect documentation).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the write lock up front: a deferred transaction that later tries to write
        # fails at once with SQLITE_BUSY in WAL mode instead of waiting for the lock.
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@dataclass(frozen=True)
class ComputationRow:
    id: int
    key: str
    name: str
    kind: str
    initial_state: str
    member_count: int
    last_run_id: int | None
    last_run_at: datetime | None
    last_success_at: datetime | None
    next_due_at: datetime | None
    consecutive_failures: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    fencing_token: int
    applied_columns: str | None
    forgotten_at: datetime | None = None  # `forget` dropped its current state
    level: str = "user"  # account: its members are accounts


class Store:
    """The state database."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            self.engine = create_state_engine(url)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot open the state database: {describe_db_error(exc)}") from exc
        self.dialect = self.engine.dialect.name

    def __repr__(self) -> str:
        return f"Store({mask_url(self.url)!r})"

    def dispose(self) -> None:
        self.engine.dispose()

    # -- transactions -------------------------------------------------------------------------

    # Every SQLAlchemyError raised in a transaction leaves it as a StoreError (cause chained):
    # nothing outside state/ catches driver exceptions.

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"state database error: {describe_db_error(exc)}") from exc

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction holding the write lock (SQLite) from its start."""
        try:
            with self.engine.connect() as conn:
                conn.execution_options(sqlite_immediate=True)
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"state database error: {describe_db_error(exc)}") from exc

    # -- schema --------------------------------------------------------------------------------

    def current_revision(self) -> str | None:
        """The stored schema revision (None: not initialised), by one SELECT."""
        try:
            with self.engine.connect() as conn:
                try:
                    versions = list(conn.execute(_STORED_REVISION).scalars())
                except (OperationalError, ProgrammingError):
                    conn.rollback()
                    if not inspect(conn).has_table("alembic_version"):
                        return None
                    # Created since the SELECT failed, by another process's upgrade (three
                    # daemons starting on an empty PostgreSQL schema): read it now.
                    versions = list(conn.execute(_STORED_REVISION).scalars())
        except SQLAlchemyError as exc:
            raise StoreError(f"state database error: {describe_db_error(exc)}") from exc
        if len(versions) > 1:
            raise StoreError(f"the state database has several schema revisions: {versions}")
        return str(versions[0]) if versions else None

    def head_revision(self) -> str:
        return HEAD_REVISION

    def upgrade(self) -> bool:
        """Bring the schema to the newest revision; True if anything was applied."""
        if self.current_revision() == HEAD_REVISION:
            return False
        from alembic import command

        try:
            with self.engine.connect() as conn:
                conn.execution_options(sqlite_immediate=True)
                command.upgrade(_alembic_config(conn), "head")
                conn.commit()
            return True
        except SQLAlchemyError as exc:
            raise StoreError(
                f"cannot upgrade the state database: {describe_db_error(exc)}") from exc

    def setting(self, name: str, default: str) -> str:
        """A value this store keeps about itself: stored once (`default` the first time, by
        whichever process comes first), the same for every process after.

        :raises StoreError: the state database failed.
        """
        table = t.store_settings
        try:
            with self.write() as conn:
                conn.execute(insert_ignore(conn.dialect.name, table).values(
                    name=name, value=default))
                return str(conn.execute(select(table.c.value).where(
                    table.c.name == name)).scalar_one())
        except SQLAlchemyError as exc:
            raise StoreError(f"state database error: {describe_db_error(exc)}") from exc

    def space_id(self) -> str:
        """The personas space_id when the config names no `space:`: random once, then
        stable for this state store."""
        return self.setting("space_id", secrets.token_hex(10))

    # -- computations --------------------------------------------------------------------------

    def register(self, computations: Sequence[Computation], at: datetime) -> None:
        """Create a row for each configured audience or trait the store does not know yet."""
        with self.write() as conn:
            known = {row.key: row for row in conn.execute(
                select(t.computations.c.key, t.computations.c.name,
                       t.computations.c.definition_hash, t.computations.c.kind,
                       t.computations.c.forgotten_at))}
            for comp in computations:
                row = known.get(comp.key)
                if row is None:
                    # Several daemons starting at once register the same audiences.
                    conn.execute(insert_ignore(self.dialect, t.computations).values(
                        key=comp.key, name=comp.name, kind=comp.kind,
                        definition_hash=comp.definition_hash, created_at=at,
                        initial_state=InitialState.PENDING, next_due_at=at, level=comp.level))
                elif row.forgotten_at is not None:
                    # A forgotten key configured again starts over (forget reset its state).
                    conn.execute(update(t.computations)
                                 .where(t.computations.c.key == comp.key)
                                 .values(name=comp.name, definition_hash=comp.definition_hash,
                                         forgotten_at=None, next_due_at=at, level=comp.level))
                elif (row.name, row.definition_hash) != (comp.name, comp.definition_hash):
                    conn.execute(update(t.computations)
                                 .where(t.computations.c.key == comp.key)
                                 .values(name=comp.name, definition_hash=comp.definition_hash,
                                         level=comp.level))

    def computation(self, key: str, conn: Connection | None = None) -> ComputationRow | None:
        query = select(*_COMPUTATION_COLUMNS).where(t.computations.c.key == key)
        if conn is not None:
            row = conn.execute(query).first()
        else:
            with self.read() as c:
                row = c.execute(query).first()
        return ComputationRow(**row._asdict()) if row else None

    def computations(self) -> list[ComputationRow]:
        with self.read() as conn:
            rows = conn.execute(select(*_COMPUTATION_COLUMNS).order_by(t.computations.c.id))
            return [ComputationRow(**row._asdict()) for row in rows]


def open_without_writing(url: str) -> Store:
    """The state database, for commands that must write nothing (`check`, dry runs): opened
    only when it exists with the current schema; nothing is created, migrated or registered.

    :raises StoreError: it is missing or not at the head revision; the message says what
        `db upgrade` would do.
    """
    where = f"state database at {make_url(url).render_as_string(hide_password=True)}"
    advice = "run `audience-sync db upgrade`"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        # Connecting would create the file (and Store would create its folder): look first.
        if database in ("", ":memory:") or (not database.startswith("file:")
                                            and not Path(database).is_file()):
            raise StoreError(f"{where} is not initialised: {advice}")
    store = Store(url)
    try:
        current, head = store.current_revision(), store.head_revision()
    except StoreError:
        store.dispose()
        raise
    if current != head:
        store.dispose()
        if current is None:
            raise StoreError(f"{where} is not initialised: {advice}")
        raise StoreError(f"{where} is at revision {current}, head is {head}: {advice}")
    return store


_STORED_REVISION = text("SELECT version_num FROM alembic_version")

_COMPUTATION_COLUMNS = (
    t.computations.c.id, t.computations.c.key, t.computations.c.name, t.computations.c.kind,
    t.computations.c.initial_state, t.computations.c.member_count, t.computations.c.last_run_id,
    t.computations.c.last_run_at, t.computations.c.last_success_at, t.computations.c.next_due_at,
    t.computations.c.consecutive_failures, t.computations.c.lease_owner,
    t.computations.c.lease_expires_at, t.computations.c.fencing_token,
    t.computations.c.applied_columns, t.computations.c.forgotten_at, t.computations.c.level,
)


def insert_ignore(dialect: str, table: Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING, in the dialect's own spelling."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()
