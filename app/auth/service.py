from __future__ import annotations

import uuid

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.auth.models import Host
from app.crypto import Sealed, new_digest_key
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


def digest_key(host_id: uuid.UUID) -> bytes:
    """The Host's idempotency digest key (the Host exists): random, sealed under the master key, made the
    first time it is needed.

    Call it before the caller's transaction writes anything: a key it makes is committed at once. Two first
    requests at the same moment end with one key: the second's write waits for the first's (the Host's row
    lock on PostgreSQL, the write lock on SQLite), then finds the key set and reads it.
    """
    keyring = current_app.extensions["keyring"]
    stored = select(Host.digest_key_id, Host.digest_key_sealed).where(Host.id == host_id)
    row = db.session.execute(stored).one()
    if row.digest_key_sealed is None:
        sealed = keyring.seal_digest_key(host_id, new_digest_key())
        db.session.execute(
            update(Host)
            .where(Host.id == host_id, Host.digest_key_sealed.is_(None))
            .values(digest_key_id=sealed.key_id, digest_key_sealed=sealed.ciphertext)
        )
        db.session.commit()
        row = db.session.execute(stored).one()
    return keyring.open_digest_key(host_id, Sealed(row.digest_key_id, row.digest_key_sealed))


def set_will_active(host_id: uuid.UUID, active: bool) -> Host:
    ensure_host(host_id)
    host = db.session.get(Host, host_id, with_for_update=True)
    assert host is not None
    host.will_active = active
    db.session.commit()
    return host
