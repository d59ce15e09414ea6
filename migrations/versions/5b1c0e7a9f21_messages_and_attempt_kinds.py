"""messages, attempt kinds and deadlines, one test or check in flight per connector

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
OPEN_PROBE = sa.text("status IN ('pending', 'sending') AND kind IN ('test', 'check')")


def upgrade():
    op.create_table('messages',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('host_id', sa.Uuid(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=False),
    sa.Column('request_digest', sa.String(length=64), nullable=False),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('routes', sa.JSON(), nullable=False),
    sa.Column('recipient_masked', sa.JSON(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('due_at', sa.DateTime(), nullable=True),
    sa.Column('not_before', sa.DateTime(), nullable=True),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.Column('delivered_via_connector_id', sa.Uuid(), nullable=True),
    sa.Column('delivered_via_type', sa.String(length=16), nullable=True),
    sa.Column('body_key_id', sa.String(length=32), nullable=True),
    sa.Column('body_sealed', sa.LargeBinary(), nullable=True),
    sa.ForeignKeyConstraint(['host_id'], ['hosts.id'], name=op.f('fk_messages_host_id_hosts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('host_id', 'idempotency_key', name='uq_messages_host_idempotency_key')
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_host_created', ['host_id', 'created_at'], unique=False)
        batch_op.create_index('ix_messages_status_due', ['status', 'due_at'], unique=False)

    # Attempts left open by an earlier version are closed: nothing will ever close them otherwise.
    op.execute(
        "UPDATE delivery_attempts SET status = 'timeout', error_code = 'timeout', "
        "message = 'closed by the upgrade', finished_at = created_at WHERE status IN ('pending', 'sending')"
    )
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('connector_type', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('kind', sa.String(length=16), server_default='test', nullable=False))
        batch_op.add_column(sa.Column('message_id', sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column('round', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('deadline_at', sa.DateTime(), nullable=True))
        batch_op.alter_column('destination', existing_type=sa.String(length=320), nullable=True)
        batch_op.alter_column('connector_id', existing_type=sa.Uuid(), nullable=True)
        # A dispatch attempt outlives its connector; the connectors service deletes tests and checks itself.
        batch_op.drop_constraint('fk_delivery_attempts_connector_id_connectors', type_='foreignkey')
        batch_op.create_foreign_key(
            batch_op.f('fk_delivery_attempts_connector_id_connectors'), 'connectors', ['connector_id'], ['id'],
            ondelete='SET NULL')
        batch_op.create_foreign_key(
            batch_op.f('fk_delivery_attempts_message_id_messages'), 'messages', ['message_id'], ['id'],
            ondelete='CASCADE')
        batch_op.create_index(
            'uq_delivery_attempts_message_connector_round', ['message_id', 'connector_id', 'round'], unique=True)
    op.execute("UPDATE delivery_attempts SET connector_type = "
               "(SELECT type FROM connectors WHERE connectors.id = delivery_attempts.connector_id)")
    op.create_index('uq_delivery_attempts_one_open_per_connector', 'delivery_attempts', ['connector_id'],
                    unique=True, postgresql_where=OPEN_PROBE, sqlite_where=OPEN_PROBE)
    op.create_index('ix_delivery_attempts_open_deadline', 'delivery_attempts', ['deadline_at'],
                    postgresql_where=OPEN, sqlite_where=OPEN)


def downgrade():
    op.drop_index('ix_delivery_attempts_open_deadline', table_name='delivery_attempts')
    op.drop_index('uq_delivery_attempts_one_open_per_connector', table_name='delivery_attempts')
    op.execute("DELETE FROM delivery_attempts WHERE connector_id IS NULL OR kind <> 'test'")
    op.execute("UPDATE delivery_attempts SET destination = '' WHERE destination IS NULL")
    with op.batch_alter_table('delivery_attempts', schema=None) as batch_op:
        batch_op.drop_index('uq_delivery_attempts_message_connector_round')
        batch_op.drop_constraint('fk_delivery_attempts_message_id_messages', type_='foreignkey')
        batch_op.drop_constraint('fk_delivery_attempts_connector_id_connectors', type_='foreignkey')
        batch_op.create_foreign_key(
            batch_op.f('fk_delivery_attempts_connector_id_connectors'), 'connectors', ['connector_id'], ['id'],
            ondelete='CASCADE')
        batch_op.alter_column('connector_id', existing_type=sa.Uuid(), nullable=False)
        batch_op.alter_column('destination', existing_type=sa.String(length=320), nullable=False)
        batch_op.drop_column('deadline_at')
        batch_op.drop_column('round')
        batch_op.drop_column('message_id')
        batch_op.drop_column('kind')
        batch_op.drop_column('connector_type')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_status_due')
        batch_op.drop_index('ix_messages_host_created')
    op.drop_table('messages')
