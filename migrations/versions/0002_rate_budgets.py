"""rate budgets shared by daemons

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 17:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rate_budgets',
    sa.Column('destination', sa.String(length=100), nullable=False),
    sa.Column('next_free', sa.Float(precision=53), nullable=False),
    sa.PrimaryKeyConstraint('destination', name=op.f('pk_rate_budgets'))
    )


def downgrade() -> None:
    op.drop_table('rate_budgets')
