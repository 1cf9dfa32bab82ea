"""outbox indexes without status: pending and failed rows in partial indexes

Marking a delivery sent moved its entries in two indexes that held `status`; now it only
leaves the small partial indexes of pending rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 19:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PENDING = sa.text("status = 'pending'")
FAILED = sa.text("status = 'failed'")


def upgrade() -> None:
    op.create_index("ix_deliveries_queue", "deliveries", ["destination", "id"],
                    postgresql_where=PENDING, sqlite_where=PENDING)
    op.create_index("ix_deliveries_failed", "deliveries", ["id"],
                    postgresql_where=FAILED, sqlite_where=FAILED)
    op.create_index("ix_deliveries_computation_id_user_id", "deliveries",
                    ["computation_id", "user_id"])
    op.drop_index("ix_deliveries_destination_status_id", table_name="deliveries")
    op.drop_index("ix_deliveries_computation_id_user_id_status", table_name="deliveries")


def downgrade() -> None:
    op.create_index("ix_deliveries_destination_status_id", "deliveries",
                    ["destination", "status", "id"])
    op.create_index("ix_deliveries_computation_id_user_id_status", "deliveries",
                    ["computation_id", "user_id", "status"])
    op.drop_index("ix_deliveries_computation_id_user_id", table_name="deliveries")
    op.drop_index("ix_deliveries_failed", table_name="deliveries")
    op.drop_index("ix_deliveries_queue", table_name="deliveries")
