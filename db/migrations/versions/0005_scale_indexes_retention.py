"""scale: indexes for the lists and passes that must stay flat as history grows; instance retention

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('instances_removed_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_study_first_received', 'study', ['first_received_at', 'id'])
    op.create_index('ix_series_state_completed', 'series', ['state', 'completed_at'])
    op.create_index('ix_instance_received', 'instance', ['received_at', 'series_id'])
    op.create_index('ix_job_outputs_removed_updated', 'job', ['outputs_removed_at', 'updated_at'])


def downgrade() -> None:
    op.drop_index('ix_job_outputs_removed_updated', table_name='job')
    op.drop_index('ix_instance_received', table_name='instance')
    op.drop_index('ix_series_state_completed', table_name='series')
    op.drop_index('ix_study_first_received', table_name='study')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('instances_removed_at')
