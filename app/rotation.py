"""Rotating the master key: everything sealed under an older key, sealed again under the current one.

`flask --app wsgi reseal-configs` runs it after a deploy that set the new MASTER_KEY and kept the old one in
OLD_MASTER_KEYS; once it reports nothing that no known key opens, the old key can go.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update

from app.attempts import DeliveryAttempt
from app.auth.models import Host
from app.connectors.models import Connector
from app.connectors.service import keyring
from app.crypto import Sealed, SealError
from app.extensions import db
from app.messages.models import Message


def reseal_all(batch_size: int = 500) -> Resealed:
    """Re-seal under the current master key everything another key sealed: connector configs, the bodies of
    messages still in flight (a final message's is erased), Hosts' digest keys and the destinations of tests in
    progress. Once it reports nothing
    that no known key opens, no row needs a key of OLD_MASTER_KEYS any more.

    A row that no known key opens is left as it is and reported (by its id; a digest key by its Host's id), so
    one bad row does not stop the rotation of all the others.
    """
    return Resealed(
        connectors=_reseal_column(
            Connector, Connector.host_id, Connector.config_key_id, Connector.config_sealed, batch_size
        ),
        message_bodies=_reseal_column(Message, Message.host_id, Message.body_key_id, Message.body_sealed, batch_size),
        digest_keys=_reseal_column(Host, Host.id, Host.digest_key_id, Host.digest_key_sealed, batch_size),
        test_destinations=_reseal_column(
            DeliveryAttempt,
            select(Connector.host_id).where(Connector.id == DeliveryAttempt.connector_id).scalar_subquery(),
            DeliveryAttempt.destination_key_id,
            DeliveryAttempt.destination_sealed,
            batch_size,
        ),
    )


@dataclass
class ResealedKind:
    count: int = 0
    unopenable: list[uuid.UUID] = field(default_factory=list)


@dataclass(frozen=True)
class Resealed:
    connectors: ResealedKind
    message_bodies: ResealedKind
    digest_keys: ResealedKind
    test_destinations: ResealedKind  # of tests in progress: erased when a test ends


def _reseal_column(entity: Any, host_id: Any, key_id: Any, sealed: Any, batch_size: int) -> ResealedKind:
    """Re-seal one kind of sealed value (`sealed`, with its master key's id in `key_id`, sealed for the Host in
    `host_id` and bound to the row's id), in batches of one transaction each.

    A batch locks rows of this one kind only, in id order, so it never closes a circle with the writers' lock
    order (see `lock_for_verdict`). FOR NO KEY UPDATE: a claim of the message, a config replaced, a digest key
    made wait for the batch (and the batch for them), so none reads a value half re-sealed; the rows' keys stay,
    so attempts being inserted for them need not wait.
    """
    ring, done = keyring(), ResealedKind()
    columns = entity.id.label("row_id"), host_id.label("host_id"), key_id.label("key_id"), sealed.label("sealed")
    stale = select(*columns).where(sealed.is_not(None), key_id != ring.current_id)
    while True:
        query = stale.where(entity.id.not_in(done.unopenable)) if done.unopenable else stale
        rows = db.session.execute(query.order_by(entity.id).limit(batch_size).with_for_update(key_share=True)).all()
        if not rows:
            return done
        for row in rows:
            try:
                value = ring.open(row.host_id, row.row_id, Sealed(row.key_id, row.sealed))
            except SealError:
                done.unopenable.append(row.row_id)
                continue
            fresh = ring.seal(row.host_id, row.row_id, value)
            # Only over what was read: SQLite has no row locks, and a body erased or a config replaced since
            # stays as its writer left it (a row still sealed under an old key comes back in the next batch).
            written = db.session.execute(
                update(entity)
                .where(entity.id == row.row_id, sealed == row.sealed)
                .values({key_id: fresh.key_id, sealed: fresh.ciphertext})
                .execution_options(synchronize_session=False)
            )
            done.count += written.rowcount
        db.session.commit()
