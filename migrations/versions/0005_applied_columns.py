"""computations.applied_columns: the snapshot columns of the last applied run

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 18:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("computations") as batch:
        batch.add_column(sa.Column("applied_columns", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("computations") as batch:
        batch.drop_column("applied_columns")
