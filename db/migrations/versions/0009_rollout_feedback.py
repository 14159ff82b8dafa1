"""rollout and feedback: the mode each job ran under (live, silent, review) with the review decision and its
deadline, the loader's input statistics per job (drift monitoring), the operators' mode overrides per plugin or
rule, and the readers' feedback on results (insert-only history)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rollout', sa.String(length=16), nullable=False, server_default='live'))
        batch_op.add_column(sa.Column('review_hours', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('review_timeout', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('review_state', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('reviewed_by', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('review_note', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('review_due_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('input_stats', sa.JSON(), nullable=True))
        batch_op.create_index('ix_job_review_due', ['review_state', 'review_due_at'])
        batch_op.create_index('ix_job_created', ['created_at'])  # monitoring windows
    op.create_table(
        'rollout_mode',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('scope', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('review_hours', sa.Float(), nullable=True),
        sa.Column('on_timeout', sa.String(length=16), nullable=True),
        sa.Column('updated_by', sa.String(length=64), nullable=True),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint('scope', 'name', name='uq_rollout_scope_name'),
    )
    op.create_table(
        'feedback',
        sa.Column('id', sa.Integer(), primary_key=True),
        sa.Column('job_id', sa.Integer(), sa.ForeignKey('job.id'), nullable=False),
        sa.Column('reader', sa.String(length=64), nullable=False),
        sa.Column('target_kind', sa.String(length=16), nullable=False),
        sa.Column('target', sa.String(length=128), nullable=False),
        sa.Column('verdict', sa.String(length=16), nullable=False),
        sa.Column('comment', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_feedback_job_created', 'feedback', ['job_id', 'created_at'])
    op.create_index('ix_feedback_created', 'feedback', ['created_at'])


def downgrade() -> None:
    op.drop_index('ix_feedback_created', table_name='feedback')
    op.drop_index('ix_feedback_job_created', table_name='feedback')
    op.drop_table('feedback')
    op.drop_table('rollout_mode')
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_created')
        batch_op.drop_index('ix_job_review_due')
        for column in ('input_stats', 'review_due_at', 'review_note', 'reviewed_at', 'reviewed_by', 'review_state',
                       'review_timeout', 'review_hours', 'rollout'):
            batch_op.drop_column(column)
