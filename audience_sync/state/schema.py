"""The state store's schema: the one source of truth; migrations are generated from it.

The history tables are part of the product's interface (users query them with sqlite3 or psql),
so their columns have plain names.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    literal_column,
    text,
)

from audience_sync.messages import USER_ID_MAX
from audience_sync.states import DeliveryStatus, InitialState

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on SQLite as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the state store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")


computations = Table(
    "computations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(100), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("kind", String(16), nullable=False),  # audience | trait
    Column("definition_hash", String(32), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # pending (never run) | delivering (initial run committed, deliveries outstanding) | complete
    Column("initial_state", String(16), nullable=False, server_default=InitialState.PENDING.value),
    Column("member_count", Integer, nullable=False, server_default="0"),
    Column("last_run_id", Integer, nullable=True),
    Column("last_run_at", UTCDateTime, nullable=True),
    Column("last_success_at", UTCDateTime, nullable=True),
    Column("next_due_at", UTCDateTime, nullable=True),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("fencing_token", BigInteger, nullable=False, server_default="0"),
    # The snapshot columns of the last applied run ("user_id" for an ids-only audience): when
    # it was ids-only and still is, no member can have a changed sent value to look for.
    Column("applied_columns", String(200), nullable=True),
    # Set by `forget`: an orphan's current state was dropped and its history kept; it leaves
    # `status` (registering the key again clears it).
    Column("forgotten_at", UTCDateTime, nullable=True),
    # user | account: an account audience's members (and history rows) are accounts, their
    # `user_id` the account's id (the definition's group_id).
    Column("level", String(16), nullable=False, server_default="user"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("computation_id", Integer, ForeignKey("computations.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # initial | incremental | resync
    Column("status", String(16), nullable=False),  # running | succeeded | failed | held
    Column("clock", UTCDateTime, nullable=False),  # the :now the queries saw
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("members", Integer, nullable=False, server_default="0"),
    Column("entered", Integer, nullable=False, server_default="0"),
    Column("exited", Integer, nullable=False, server_default="0"),
    Column("changed", Integer, nullable=False, server_default="0"),
    Column("queued", Integer, nullable=False, server_default="0"),
    Column("skipped_null", Integer, nullable=False, server_default="0"),
    Column("skipped_empty", Integer, nullable=False, server_default="0"),
    Column("skipped_too_long", Integer, nullable=False, server_default="0"),
    Column("skipped_duplicate", Integer, nullable=False, server_default="0"),
    Column("skipped_bad_type", Integer, nullable=False, server_default="0"),
    Column("skipped_non_finite", Integer, nullable=False, server_default="0"),
    Column("forced", Boolean, nullable=False, server_default="0"),
    Column("fencing_token", BigInteger, nullable=False, server_default="0"),
    Column("error", Text, nullable=True),
    # An account audience fanned out to users: the users after the run and their changes
    # (null for every other run).
    Column("fan_users", Integer, nullable=True),
    Column("fan_entered", Integer, nullable=True),
    Column("fan_exited", Integer, nullable=True),
    Column("fan_changed", Integer, nullable=True),
    Index(None, "computation_id", "id"),
)

# The tables below are written in bulk by one run's transaction, after it wrote the run and
# computation rows they refer to; their computation_id and run_id carry no foreign key, whose
# per-row check doubled the cost of a run on PostgreSQL.

# The current state: one row per member of each audience (or user with a trait value).
members = Table(
    "members",
    metadata,
    Column("computation_id", Integer, primary_key=True),
    Column("user_id", String(USER_ID_MAX), primary_key=True),
    Column("email", Text, nullable=True),
    Column("name", Text, nullable=True),
    Column("title", Text, nullable=True),
    Column("company_id", Text, nullable=True),
    Column("value", Text, nullable=True),  # canonical JSON of a computed trait's value
    # An account: the user its group calls name (the definition's user_id column), and its
    # account traits (the definition's other columns, as a JSON object).
    Column("user_ref", Text, nullable=True),
    Column("traits", Text, nullable=True),
    Column("entered_run", Integer, nullable=False),
    # Clustered by (computation_id, user_id) on SQLite: the diff reads members in key order
    # and finds each one's sent values without a second lookup.
    sqlite_with_rowid=False,
)

# The users an account audience (or trait) was last fanned out to (`accounts: identify|track`):
# each user of a member account, from the source's `account_users:` query, with the account
# that put them in (the smallest id when several) and its value. The users' calls are the diff
# of this set, so a user who moves between accounts is sent the right value too.
fanout_members = Table(
    "fanout_members",
    metadata,
    Column("computation_id", Integer, primary_key=True),
    Column("user_id", String(USER_ID_MAX), primary_key=True),
    Column("group_id", String(USER_ID_MAX), nullable=False),
    Column("value", Text, nullable=True),
    Column("entered_run", Integer, nullable=False),
    sqlite_with_rowid=False,
)

# One row per stay in an audience; exited_* stay null while the user is a member.
membership_history = Table(
    "membership_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("computation_id", Integer, nullable=False),
    Column("user_id", String(USER_ID_MAX), nullable=False),
    Column("entered_at", UTCDateTime, nullable=False),
    Column("entered_run", Integer, nullable=False),
    Column("exited_at", UTCDateTime, nullable=True),
    Column("exited_run", Integer, nullable=True),
    Index(None, "computation_id", "user_id", "entered_at"),
    Index(None, "computation_id", "entered_at"),
    Index(None, "computation_id", "exited_at"),
)

# One row per period during which a user held one value of a computed trait.
trait_history = Table(
    "trait_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("computation_id", Integer, nullable=False),
    Column("user_id", String(USER_ID_MAX), nullable=False),
    Column("value", Text, nullable=True),
    Column("valid_from", UTCDateTime, nullable=False),
    Column("valid_from_run", Integer, nullable=False),
    Column("valid_to", UTCDateTime, nullable=True),
    Column("valid_to_run", Integer, nullable=True),
    Index(None, "computation_id", "user_id", "valid_from"),
    Index(None, "computation_id", "valid_from"),
)

# The partial indexes' predicates (the text must match the migrations' for autogenerate).
_PENDING = text(f"status = '{DeliveryStatus.PENDING}'")
_FAILED = text(f"status = '{DeliveryStatus.FAILED}'")

# The outbox: one row per change and destination, until the destination acknowledged it.
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("computation_id", Integer, nullable=False),
    Column("run_id", Integer, nullable=False),
    Column("destination", String(100), nullable=False),
    Column("user_id", String(USER_ID_MAX), nullable=False),
    Column("value", Text, nullable=False),  # canonical JSON: true, false, or the trait value
    Column("email", Text, nullable=True),
    Column("name", Text, nullable=True),
    Column("title", Text, nullable=True),
    Column("company_id", Text, nullable=True),
    Column("observed_at", UTCDateTime, nullable=False),
    # pending | sent | failed | superseded
    Column("status", String(16), nullable=False,
           server_default=DeliveryStatus.PENDING.value),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("sent_at", UTCDateTime, nullable=True),
    # The call this row delivers (identify | track): a destination sent both gets one row per
    # call, each acknowledged on its own, so a crash between them re-sends only the other.
    Column("call", String(16), nullable=False, server_default="identify"),
    # A group call (an account's row, `user_id` the account): the user it names, if any, and
    # the account traits it carries (JSON).
    Column("user_ref", Text, nullable=True),
    Column("traits", Text, nullable=True),
    Index(None, "computation_id", "user_id"),
    Index(None, "run_id"),
    # Pending and failed rows are few while sent ones pile up, so they have partial indexes
    # (the queue in id order, superseding, "any pending?", the failed list) and no index
    # holds `status`: marking a delivery sent only leaves the pending ones.
    Index("ix_deliveries_pending", "computation_id", "user_id",
          postgresql_where=_PENDING, sqlite_where=_PENDING),
    Index("ix_deliveries_queue", "destination", "id",
          postgresql_where=_PENDING, sqlite_where=_PENDING),
    Index("ix_deliveries_failed", "id", postgresql_where=_FAILED, sqlite_where=_FAILED),
)


# The partial index listing the rows of each unsent status in id order, for the lists of
# them: SQLite otherwise walks the whole table in id order to skip a sort.
UNSENT_INDEX = {DeliveryStatus.PENDING: "ix_deliveries_queue",
                DeliveryStatus.FAILED: "ix_deliveries_failed"}


def status_is(status: DeliveryStatus) -> ColumnElement[bool]:
    """`deliveries.status = '<status>'`, the value a literal: a bound parameter hides it from
    both planners (and from PostgreSQL's generic plans), and then neither uses the partial
    indexes on pending and failed rows. Query one status at a time: SQLite uses no partial
    index for `status IN (...)` or an OR of them."""
    return deliveries.c.status == literal_column(f"'{status.value}'")


# A request budget per destination, shared by every daemon on this state store: the next free
# request slot (Unix seconds) of a rate limiter whose state lives here (ratelimit.py).
rate_budgets = Table(
    "rate_budgets",
    metadata,
    Column("destination", String(100), primary_key=True),
    Column("next_free", Float(precision=53), nullable=False),
)


# Values this state store keeps about itself, by name: `space_id`, the stable id that fills
# `context.personas.space_id` when the config names no `space:`.
store_settings = Table(
    "store_settings",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("value", Text, nullable=False),
)

# The custom fields each destination is known to have (found on it, or created by this tool):
# a field is created once, by whichever process first inserts its row (state/fields.py).
destination_fields = Table(
    "destination_fields",
    metadata,
    Column("destination", String(100), primary_key=True),
    Column("parent", String(50), primary_key=True),  # EndUser | Company
    Column("name", String(100), primary_key=True),
    Column("type", String(20), nullable=False),
    Column("created", Boolean, nullable=False),  # by this tool (else found)
    Column("recorded_at", UTCDateTime, nullable=False),
)

# What each alert target was last told about each audience (alerts.py decides from it), so a
# condition that lasts over many runs and ticks alerts once. `target` names the alert entry
# (a hash of its settings, never its URL).
alert_state = Table(
    "alert_state",
    metadata,
    Column("computation_id", Integer, primary_key=True),
    Column("target", String(32), primary_key=True),
    Column("failing", Boolean, nullable=False, server_default="0"),
    Column("held", Boolean, nullable=False, server_default="0"),
    Column("failed_deliveries", Integer, nullable=False, server_default="0"),
    Column("updated_at", UTCDateTime, nullable=False),
)

# When each periodic chore (the daily prune) last ran, so a daemon restart or a second daemon
# does it once a day, not once per tick.
housekeeping = Table(
    "housekeeping",
    metadata,
    Column("task", String(50), primary_key=True),
    Column("last_run_at", UTCDateTime, nullable=False),
)
