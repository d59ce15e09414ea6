"""attempt kinds, deadlines, and one test or check in flight per connector

Revision ID: 5b1c0e7a9f21
Revises: d2e47583bc52
Create Date: 2026-12-02 01:10:00

"""
from alembic import op
import sqlalchemy as sa


revision = '5b1c0e7a9f21'
down_revision = 'd2e47583bc52'
branch_labels = None
depends_on = None

OPEN = sa.text("status IN ('pending', 'sending')")


def upgrade():
    # Attempts left open by an earlier version are closed: nothing will ever close them otherwise.
    op.execute(
        "UPDATE delivery_attempts SET status = 'timeout', error_code = 'timeout', "
        "message = 'closed by the upgrade', finished_at = created_at WHERE status IN ('pending', 'sending')"
    )
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='test', nullable=False))
        batch_op.add_column(sa.Column('deadline_at', sa.DateTime(), nullable=True))
        batch_op.alter_column('destination', existing_type=sa.String(length=320), nullable=True)
    op.create_index('uq_delivery_attempts_one_open_per_connector', 'delivery_attempts', ['connector_id'],
                    unique=True, postgresql_where=OPEN, sqlite_where=OPEN)
    op.create_index('ix_delivery_attempts_open_deadline', 'delivery_attempts', ['deadline_at'],
                    postgresql_where=OPEN, sqlite_where=OPEN)


def downgrade():
    op.drop_index('ix_delivery_attempts_open_deadline', table_name='delivery_attempts')
    op.drop_index('uq_delivery_attempts_one_open_per_connector', table_name='delivery_attempts')
    op.execute("UPDATE delivery_attempts SET destination = '' WHERE destination IS NULL")
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.alter_column('destination', existing_type=sa.String(length=320), nullable=False)
        batch_op.drop_column('deadline_at')
        batch_op.drop_column('kind')
