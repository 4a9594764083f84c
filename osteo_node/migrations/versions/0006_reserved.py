"""reserved: worklist (issue 16: coordinator features and security)

Revision ID: 0006
Revises: 0005
"""
from typing import Sequence, Union

revision: str = '0006'
down_revision: Union[str, None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
