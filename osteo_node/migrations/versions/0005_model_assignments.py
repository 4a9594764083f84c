"""model assignments: shadow models, promote and rollback (issue 14)

Written against a database at 0004 and checked with `alembic check` (tests/test_queue.py).

Revision ID: 0005
Revises: 0004
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('model_assignments',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('live_device_uid', sa.String(length=64), nullable=False),
    sa.Column('live_entry', sa.Text(), nullable=False),
    sa.Column('live_name', sa.String(length=64), nullable=False),
    sa.Column('live_version', sa.String(length=32), nullable=False),
    sa.Column('previous_device_uid', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('model_assignments')
