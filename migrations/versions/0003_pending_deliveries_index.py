"""partial index on pending deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 18:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_index("ix_deliveries_pending", "deliveries", ["computation_id", "user_id"],
                    unique=False, postgresql_where=PENDING, sqlite_where=PENDING)


def downgrade() -> None:
    op.drop_index("ix_deliveries_pending", table_name="deliveries")
