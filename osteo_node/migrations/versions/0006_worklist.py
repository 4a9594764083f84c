"""worklist (issue 16): who to call, appointment and assignment, the referral's current DXA row

Revision ID: 0006
Revises: 0005
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patient_phone', sa.String(length=64), server_default='',
                                      nullable=False))
        batch_op.add_column(sa.Column('referring_physician', sa.String(length=324), server_default='',
                                      nullable=False))
        batch_op.add_column(sa.Column('appointment_date', sa.Date(), nullable=True))
        batch_op.add_column(sa.Column('assigned_to', sa.String(length=64), server_default='',
                                      nullable=False))
        batch_op.add_column(sa.Column('dxa_result_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key('fk_referrals_dxa_result_id', 'dxa_results', ['dxa_result_id'],
                                    ['id'])


def downgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.drop_constraint('fk_referrals_dxa_result_id', type_='foreignkey')
        batch_op.drop_column('dxa_result_id')
        batch_op.drop_column('assigned_to')
        batch_op.drop_column('appointment_date')
        batch_op.drop_column('referring_physician')
        batch_op.drop_column('patient_phone')
