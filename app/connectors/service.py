"""Connector operations. Each function owns its transaction."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from typing import Any, Literal

from flask import current_app
from marshmallow import ValidationError
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import load_only

from app.attempts import MESSAGE, DeliveryAttempt
from app.auth.models import Host
from app.auth.service import ensure_host, lock_host
from app.channels import check_allowed, load_config
from app.connectors.models import Connector
from app.crypto import Keyring, Sealed
from app.errors import LAST_CONNECTOR, ConflictError, InvalidError, NotFoundError
from app.events.service import announce, connector_event
from app.extensions import db
from app.timeutil import db_now


def keyring() -> Keyring:
    return current_app.extensions["keyring"]


def _seal(connector: Connector, config: dict[str, Any]) -> None:
    sealed = keyring().seal(connector.host_id, connector.id, config)
    connector.config_key_id, connector.config_sealed = sealed.key_id, sealed.ciphertext


def open_config(connector: Connector) -> dict[str, Any]:
    """The decrypted config of a connector."""
    sealed = Sealed(connector.config_key_id, connector.config_sealed)
    return keyring().open(connector.host_id, connector.id, sealed)


def _allowed(connector_type: str, config: dict[str, Any]) -> dict[str, Any]:
    """The config, if this deployment lets a connector reach what it names; a 400 naming the field otherwise."""
    try:
        check_allowed(connector_type, config, current_app.config["ALLOW_PRIVATE_DESTINATIONS"])
    except ValidationError as exc:
        raise InvalidError("Invalid config", errors={"json": {"config": exc.messages}}) from None
    return config


def _duplicate(connector_type: str, name: str) -> ConflictError:
    return ConflictError(f"A connector of type {connector_type} named {name!r} already exists")


# The busiest read, built once: SQLAlchemy memoizes a statement's cache key on the statement object, so a
# statement rebuilt per request costs its construction and its key every time. It loads only the columns the
# list shows; raiseload makes any other attribute an error instead of a query per row.
_LIST = (
    select(Connector)
    .options(
        load_only(
            Connector.id,
            Connector.type,
            Connector.name,
            Connector.is_verified,
            Connector.priority,
            Connector.created_at,
            raiseload=True,
        )
    )
    .where(Connector.host_id == bindparam("host_id"))
    .order_by(Connector.priority, Connector.created_at, Connector.id)
)


def list_connectors(host_id: uuid.UUID) -> list[Connector]:
    # One SELECT is consistent on its own: without a transaction around it, no BEGIN and ROLLBACK round trips.
    db.session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    return list(db.session.scalars(_LIST, {"host_id": host_id}))


# Row locks of get_connector: "write" (FOR NO KEY UPDATE) holds off other writers of the row, not the inserts
# of attempts that refer to it; "delete" (FOR UPDATE) holds off those too.
_ROW_LOCKS: dict[str, Any] = {"write": {"key_share": True}, "delete": True}


def get_connector(
    host_id: uuid.UUID, connector_id: uuid.UUID, *, lock: Literal["write", "delete"] | None = None
) -> Connector:
    """The Host's connector; another Host's is as unknown as a missing one. With `lock`, its row is read
    locked until the caller's transaction ends (on PostgreSQL, one deleted meanwhile is then not found)."""
    connector = db.session.get(
        Connector, connector_id, with_for_update=_ROW_LOCKS[lock] if lock else None, populate_existing=lock is not None
    )
    if connector is None or connector.host_id != host_id:
        raise NotFoundError("Connector not found")
    return connector


def first_check_at(now: datetime) -> datetime:
    """A random moment within the re-check interval: connectors are checked evenly over it, not all at once."""
    return now + timedelta(seconds=random.uniform(0, current_app.config["CONNECTOR_CHECK_INTERVAL"]))


def lock_for_verdict(connector_id: uuid.UUID) -> None:
    """Lock the connector's row before the caller writes the attempt that `record_verdict` judges.

    Writers lock in one order: the Host, the message, the connector, its attempts, and last the events' lock
    (see `emit`). A delete locks the connector, then its attempts (their connector_id is set NULL); a send
    recorded attempt-first would wait for the connector while holding what the delete waits for."""
    db.session.execute(select(Connector.id).where(Connector.id == connector_id).with_for_update(**_ROW_LOCKS["write"]))


def record_verdict(
    connector_id: uuid.UUID, sealed: bytes, verified: bool, error_code: str | None, message: str | None
) -> None:
    """A provider's verdict on the config that was used (a config replaced meanwhile has not been judged):
    is_verified, the next re-check a whole interval away, and an event when is_verified changes. Part of the
    caller's transaction, which has called `lock_for_verdict` first."""
    now = db_now()
    judged = Connector.id == connector_id, Connector.config_sealed == sealed
    next_check = now + timedelta(seconds=current_app.config["CONNECTOR_CHECK_INTERVAL"])
    db.session.execute(update(Connector).where(*judged).values(next_check_at=next_check))
    changed = db.session.scalars(
        update(Connector)
        .where(*judged, Connector.is_verified != verified)
        .values(is_verified=verified)
        .returning(Connector.id)
    ).first()
    if changed is not None:
        connector = db.session.get(Connector, connector_id)
        if connector is not None:
            kind = "connector.verified" if verified else "connector.unverified"
            connector_event(kind, connector, error_code=None if verified else error_code, message=message)


def create_connector(host_id: uuid.UUID, data: dict[str, Any]) -> Connector:
    config = _allowed(data["type"], data["config"])
    ensure_host(host_id)
    connector = Connector(
        id=uuid.uuid4(),
        host_id=host_id,
        type=data["type"],
        name=data["name"],
        priority=data["priority"],
        next_check_at=first_check_at(db_now()),
    )
    _seal(connector, config)
    db.session.add(connector)
    try:
        connector_event("connector.created", connector)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise _duplicate(data["type"], data["name"]) from None
    announce()
    return connector


def update_connector(host_id: uuid.UUID, connector_id: uuid.UUID, data: dict[str, Any]) -> Connector:
    # Locked from the start: a delete at the same moment goes first or after, never halfway (a 404, or the
    # update then the delete), and the row lock comes before the events' lock, as everywhere.
    connector = get_connector(host_id, connector_id, lock="write")
    unverified = False
    if "type" in data and data["type"] != connector.type:
        raise InvalidError("The type of a connector cannot change", errors={"json": {"type": ["Cannot change."]}})
    if "config" in data:
        try:
            config = load_config(connector.type, data["config"])
        except ValidationError as exc:
            raise InvalidError("Invalid config", errors={"json": {"config": exc.messages}}) from None
        _seal(connector, _allowed(connector.type, config))
        unverified = connector.is_verified  # the old verdict says nothing of the new settings
        connector.is_verified = False
        connector.next_check_at = db_now()  # check the new settings soon
    if "name" in data:
        connector.name = data["name"]
    if "priority" in data:
        connector.priority = data["priority"]
    try:
        if unverified:
            connector_event("connector.unverified", connector, message="the config was replaced")
        connector_event("connector.updated", connector)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise _duplicate(connector.type, data["name"]) from None
    announce()
    return connector


def delete_connector(host_id: uuid.UUID, connector_id: uuid.UUID) -> None:
    # Lock first, read after: every read below sees what the last delete committed.
    lock_host(host_id)
    try:
        # Then the connector, before its attempts (the delete sets their connector_id NULL): see `lock_for_verdict`.
        connector = get_connector(host_id, connector_id, lock="delete")
    except NotFoundError:
        db.session.rollback()
        raise
    host = db.session.get(Host, host_id, populate_existing=True)
    remaining = db.session.scalar(select(func.count()).select_from(Connector).where(Connector.host_id == host_id))
    if host is not None and host.will_active and remaining <= 1:
        db.session.rollback()
        raise ConflictError("Cannot delete the last connector while the will is active", error_code=LAST_CONNECTOR)
    # Its tests and checks go with it; dispatch attempts stay in their messages' history.
    db.session.execute(
        delete(DeliveryAttempt).where(DeliveryAttempt.connector_id == connector_id, DeliveryAttempt.kind != MESSAGE)
    )
    db.session.delete(connector)
    connector_event("connector.deleted", connector)  # after the delete is written: the events' lock comes last
    db.session.commit()
    announce()
