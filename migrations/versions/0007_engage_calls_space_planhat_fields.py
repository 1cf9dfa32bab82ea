"""deliveries.call (identify | track), store_settings (the default personas space_id) and
destination_fields (Planhat custom fields found or created, so each is created once)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("call", sa.String(length=16), nullable=False,
                                   server_default="identify"))
    op.create_table(
        "store_settings",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_store_settings")),
    )
    op.create_table(
        "destination_fields",
        sa.Column("destination", sa.String(length=100), nullable=False),
        sa.Column("parent", sa.String(length=50), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("type", sa.String(length=20), nullable=False),
        sa.Column("created", sa.Boolean(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("destination", "parent", "name",
                                name=op.f("pk_destination_fields")),
    )


def downgrade() -> None:
    op.drop_table("destination_fields")
    op.drop_table("store_settings")
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("call")
