from __future__ import annotations

import uuid

from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite

from app.auth.models import Host
from app.extensions import db
from app.timeutil import utcnow


def ensure_host(host_id: uuid.UUID) -> None:
    """Create the Host row on first use; safe when two first requests race."""
    dialect = db.session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    now = utcnow()
    statement = insert(Host).values(id=host_id, will_active=False, created_at=now, updated_at=now)
    db.session.execute(statement.on_conflict_do_nothing(index_elements=[Host.id]))


def lock_host(host_id: uuid.UUID) -> None:
    """Serialise writes that read the Host's connector count (the last-connector rule).

    A write to the Host row takes its row lock on PostgreSQL and the write lock on SQLite alike, so a
    second transaction waits here until the first has committed.
    """
    db.session.execute(update(Host).where(Host.id == host_id).values(updated_at=utcnow()))


def set_will_active(host_id: uuid.UUID, active: bool) -> Host:
    ensure_host(host_id)
    host = db.session.get(Host, host_id, with_for_update=True)
    assert host is not None
    host.will_active = active
    db.session.commit()
    return host
