"""members clustered by key on SQLite (WITHOUT ROWID); no foreign keys on the bulk tables

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 18:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = "computation_id, user_id, email, name, title, company_id, value, entered_run"


# Checked per row on PostgreSQL (SQLite never enforced them), these doubled the cost of
# writing a run's rows; every row of these tables is written by one run's transaction, which
# creates its computation and run rows first.
FOREIGN_KEYS = [
    ("members", "fk_members_computation_id_computations"),
    ("membership_history", "fk_membership_history_computation_id_computations"),
    ("trait_history", "fk_trait_history_computation_id_computations"),
    ("deliveries", "fk_deliveries_computation_id_computations"),
    ("deliveries", "fk_deliveries_run_id_runs"),
]
PENDING = sa.text("status = 'pending'")


def _drop_foreign_keys() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, name in FOREIGN_KEYS:
            op.drop_constraint(name, table, type_="foreignkey")
        return
    # SQLite drops a constraint by copying the table; batch mode would lose the partial index.
    op.drop_index("ix_deliveries_pending", table_name="deliveries")
    for table in ("membership_history", "trait_history", "deliveries"):
        with op.batch_alter_table(table, recreate="always") as batch:
            for owner, name in FOREIGN_KEYS:
                if owner == table:
                    batch.drop_constraint(name, type_="foreignkey")
    op.create_index("ix_deliveries_pending", "deliveries", ["computation_id", "user_id"],
                    unique=False, postgresql_where=PENDING, sqlite_where=PENDING)


def _rebuild(with_rowid: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return  # PostgreSQL has no such table option
    op.execute(f"""
        CREATE TABLE members_new (
            computation_id INTEGER NOT NULL,
            user_id VARCHAR(255) NOT NULL,
            email TEXT, name TEXT, title TEXT, company_id TEXT, value TEXT,
            entered_run INTEGER NOT NULL,
            CONSTRAINT pk_members PRIMARY KEY (computation_id, user_id)
        ){"" if with_rowid else " WITHOUT ROWID"}""")
    op.execute(f"INSERT INTO members_new ({COLUMNS}) SELECT {COLUMNS} FROM members")
    op.execute("DROP TABLE members")
    op.execute("ALTER TABLE members_new RENAME TO members")


def upgrade() -> None:
    _rebuild(with_rowid=False)
    _drop_foreign_keys()


def downgrade() -> None:
    raise NotImplementedError("0004 is not reversible: restore from a backup")
