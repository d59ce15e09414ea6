"""providers' message ids and receipts on attempts, confirmation asked of messages

Revision ID: f1b9d2c7e804
Revises: e5a8c3f10b77
Create Date: 2026-12-04 20:00:00

"""
from alembic import op
import sqlalchemy as sa


revision = 'f1b9d2c7e804'
down_revision = 'e5a8c3f10b77'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('provider_message_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('receipt', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('receipt_at', sa.DateTime(), nullable=True))
        batch_op.create_index(
            'ix_delivery_attempts_connector_provider_message', ['connector_id', 'provider_message_id'], unique=False
        )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('confirm_by', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('confirm_within', sa.Integer(), nullable=True))


def downgrade():
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('confirm_within')
        batch_op.drop_column('confirm_by')
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_attempts_connector_provider_message')
        batch_op.drop_column('receipt_at')
        batch_op.drop_column('receipt')
        batch_op.drop_column('provider_message_id')
