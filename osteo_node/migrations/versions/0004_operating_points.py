"""operating points: site operating points per model version (issue 14)

Written against a database at 0003, checked with `alembic check` (tests/test_queue.py).

Revision ID: 0004
Revises: 0003
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('operating_points',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_uid', sa.String(length=64), nullable=False),
    sa.Column('model_name', sa.String(length=64), nullable=False),
    sa.Column('model_version', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('low_bmd_threshold', sa.Float(), nullable=False),
    sa.Column('osteoporosis_threshold', sa.Float(), nullable=False),
    sa.Column('basis', sa.String(length=32), nullable=False),
    sa.Column('target', sa.Float(), nullable=True),
    sa.Column('pairs', sa.Integer(), nullable=False),
    sa.Column('expected', sa.Text(), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('device_uid', 'version', name='uq_operating_points_version')
    )


def downgrade() -> None:
    op.drop_table('operating_points')
