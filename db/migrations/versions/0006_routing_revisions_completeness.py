"""study routing, priority, hours, revisions, completeness: the study's routed_at and route note; the
called AE title and RequestedProcedurePriority per series; jobs held until a time; each job's result
revision (input digest, object identities, earlier revisions); the completeness evidence
(ImagesInAcquisition per instance, expected count and completion reason per series)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('routed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('route_note', sa.Text(), nullable=True))
    # studies completed before study-level rules existed count as routed: adding such a rule later must not
    # route the whole history
    op.execute("UPDATE study SET state = 'routed', routed_at = completed_at WHERE state = 'complete'")
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('called_ae', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('requested_priority', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('expected_instances', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('completion_reason', sa.String(length=160), nullable=True))
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.add_column(sa.Column('acquisition_number', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('images_in_acquisition', sa.Integer(), nullable=True))
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('revision', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('inputs_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('objects', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('history', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('extra_series', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE study SET state = 'complete' WHERE state = 'routed'")
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('route_note')
        batch_op.drop_column('routed_at')
    with op.batch_alter_table('job', schema=None) as batch_op:
        for column in ('extra_series', 'history', 'objects', 'inputs_sha256', 'revision', 'not_before'):
            batch_op.drop_column(column)
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_column('images_in_acquisition')
        batch_op.drop_column('acquisition_number')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('completion_reason')
        batch_op.drop_column('expected_instances')
        batch_op.drop_column('requested_priority')
        batch_op.drop_column('called_ae')
