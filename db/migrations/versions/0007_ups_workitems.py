"""UPS worklist provider: the workitem table (UPS instances, PS3.4 Annex CC) with the columns its searches use

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'workitem',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('uid', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('transaction_uid', sa.String(length=64), nullable=True),
        sa.Column('dataset', sa.JSON(), nullable=False),
        sa.Column('plugin', sa.String(length=64), nullable=True),
        sa.Column('scheduled_start', sa.String(length=14), nullable=True),
        sa.Column('priority', sa.String(length=8), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=True),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('cancel_requested_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('cancel_requested_by', sa.String(length=64), nullable=True),
        sa.Column('cancel_reason', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('uid'),
    )
    op.create_index('ix_workitem_state_start', 'workitem', ['state', 'scheduled_start'])
    op.create_index('ix_workitem_plugin_state', 'workitem', ['plugin', 'state'])
    op.create_index('ix_workitem_patient', 'workitem', ['patient_id'])


def downgrade() -> None:
    op.drop_index('ix_workitem_patient', table_name='workitem')
    op.drop_index('ix_workitem_plugin_state', table_name='workitem')
    op.drop_index('ix_workitem_state_start', table_name='workitem')
    op.drop_table('workitem')
