"""dispatch: destinations per job, delivery leases, output retention

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destinations', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('outputs_removed_at', sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('started_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('instances', sa.Integer(), nullable=True))
        batch_op.create_index('ix_delivery_state_next', ['state', 'next_attempt_at'])


def downgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_state_next')
        batch_op.drop_column('instances')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('started_at')
        batch_op.drop_column('enqueued_at')

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('outputs_removed_at')
        batch_op.drop_column('destinations')
