"""UPS task performer: one row per worklist workitem radnode claimed (IHE AIW-I), written before the claim

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'performed_task',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('provider_url', sa.String(length=512), nullable=False),
        sa.Column('workitem_uid', sa.String(length=64), nullable=False),
        sa.Column('transaction_uid', sa.String(length=64), nullable=False),
        sa.Column('plugin', sa.String(length=64), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=True),
        sa.Column('series_uids', sa.JSON(), nullable=True),
        sa.Column('job_ids', sa.JSON(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=True),
        sa.Column('reason_code', sa.String(length=16), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('provider_url', 'workitem_uid', name='uq_performed_task_workitem'),
    )
    op.create_index('ix_performed_task_state', 'performed_task', ['state'])


def downgrade() -> None:
    op.drop_index('ix_performed_task_state', table_name='performed_task')
    op.drop_table('performed_task')
