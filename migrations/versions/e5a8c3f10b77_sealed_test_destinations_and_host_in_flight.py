"""a test's destination sealed in its attempt, messages by Host and status, a connector's tests and checks

Revision ID: e5a8c3f10b77
Revises: c41d7e9b2a60
Create Date: 2026-12-04 19:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'e5a8c3f10b77'
down_revision = 'c41d7e9b2a60'
branch_labels = None
depends_on = None

PROBES = sa.text("kind IN ('test', 'check')")


def upgrade():
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destination_key_id', sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column('destination_sealed', sa.LargeBinary(), nullable=True))
        batch_op.create_index(
            'ix_delivery_attempts_probe_connector_created', ['connector_id', 'created_at'], unique=False,
            postgresql_where=PROBES, sqlite_where=PROBES,
        )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_host_status', ['host_id', 'status'], unique=False)


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_host_status')
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_attempts_probe_connector_created')
        batch_op.drop_column('destination_sealed')
        batch_op.drop_column('destination_key_id')
