"""message end times for retention, Hosts' sealed digest keys for rotation

Revision ID: c41d7e9b2a60
Revises: 8e3f6a2c4d10
Create Date: 2026-12-04 18:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'c41d7e9b2a60'
down_revision = '8e3f6a2c4d10'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('finished_at', sa.DateTime(), nullable=True))
        batch_op.create_index('ix_messages_finished_at', ['finished_at'], unique=False)
    # Messages that ended before this revision: their last update is when they ended.
    op.execute(
        "UPDATE messages SET finished_at = updated_at WHERE status IN ('delivered', 'failed', 'expired')"
    )
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('digest_key_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('digest_key_sealed', sa.LargeBinary(), nullable=True))


def downgrade():
    with op.batch_alter_table('hosts', schema=None) as batch_op:
        batch_op.drop_column('digest_key_sealed')
        batch_op.drop_column('digest_key_id')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_finished_at')
        batch_op.drop_column('finished_at')
