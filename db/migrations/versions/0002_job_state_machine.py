"""jobs and deliveries: state machine columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()))
        batch_op.add_column(sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_unique_constraint('uq_delivery_job_destination', ['job_id', 'destination'])

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rule', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('priority', sa.String(length=16), nullable=False, server_default='routine'))
        batch_op.add_column(sa.Column('worker', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('warnings', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('findings', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('outputs', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('timings', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('queued_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('started_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('encoded_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column('queue',
               existing_type=sa.VARCHAR(length=64),
               nullable=False)
        batch_op.create_unique_constraint('uq_job_series_plugin', ['series_id', 'plugin'])

    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('routed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('route_note', sa.Text(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('route_note')
        batch_op.drop_column('routed_at')

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_constraint('uq_job_series_plugin', type_='unique')
        batch_op.alter_column('queue',
               existing_type=sa.VARCHAR(length=64),
               nullable=True)
        batch_op.drop_column('finished_at')
        batch_op.drop_column('delivered_at')
        batch_op.drop_column('encoded_at')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('started_at')
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('queued_at')
        batch_op.drop_column('timings')
        batch_op.drop_column('outputs')
        batch_op.drop_column('findings')
        batch_op.drop_column('warnings')
        batch_op.drop_column('worker')
        batch_op.drop_column('priority')
        batch_op.drop_column('rule')

    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_constraint('uq_delivery_job_destination', type_='unique')
        batch_op.drop_column('next_attempt_at')
        batch_op.drop_column('updated_at')

