"""Dispatch: deliver a message through a Host's connectors in priority order, with fallback and rounds.

The database is the source of truth. Creating a message commits it with its next due time before the 202;
jobs only carry ids and only speed up what the rows already say. `advance` decides the next step under the
message's row lock; `claim_send` records the attempt before the provider call (so a connector is tried at
most once per round, and never twice after a worker died mid-call); `finish_send` records the outcome. The
sweep (Celery beat) advances every message that is due, whatever job was lost.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app.attempts import FAILED as ATTEMPT_FAILED
from app.attempts import MESSAGE, SENT, UNKNOWN, DeliveryAttempt
from app.attempts import SENDING as ATTEMPT_SENDING
from app.auth.models import Host
from app.channels import CHANNELS, channel
from app.channels.base import OutgoingMessage
from app.connectors.models import Connector
from app.connectors.service import keyring, lock_for_verdict, open_config, record_verdict
from app.crypto import Sealed
from app.errors import IDEMPOTENCY_KEY_REUSED, NO_ROUTE, NotFoundError, UnprocessableError
from app.events.service import announce, emit
from app.extensions import db
from app.messages.models import (
    DELIVERED,
    EXPIRED,
    FAILED,
    IN_FLIGHT,
    QUEUED,
    RETRYING,
    SENDING,
    Message,
)
from app.outcomes import PERMANENT, WORKER_ERROR, Outcome
from app.outcomes import UNKNOWN as UNKNOWN_CODE
from app.timeutil import utcnow

log = logging.getLogger(__name__)

ADVANCE_MESSAGE = "dispatch.advance"
SEND_MESSAGE = "dispatch.send"
SUBJECTS = {
    "otp": "Your BAPBA code",
    "notification": "A message from BAPBA",
    "liveness": "BAPBA: please confirm you are still with us",
}
DEFAULT_EXPIRES_IN = {"otp": 600, "notification": 7 * 86400, "liveness": 7 * 86400}
# A connector that failed for one of these is not tried again for this message: trying again cannot mend it.
OUT_FOR_GOOD = PERMANENT | {WORKER_ERROR}
# Below this much life left, a message is not handed to a provider any more.
MIN_SEND_SECONDS = 0.2


# --- the API's side ----------------------------------------------------------------------------------------


def _digest(host_id: uuid.UUID, data: dict[str, Any]) -> str:
    return keyring().digest(host_id, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def _routes(recipient: dict[str, str], channels: list[str] | None) -> list[str]:
    return [
        name
        for name, kind in CHANNELS.items()
        if kind.recipient_field in recipient and (channels is None or name in channels)
    ]


def _candidates(host_id: uuid.UUID, routes: list[str]) -> list[Connector]:
    """The Host's connectors that can reach the recipient, in the list's order: priority, then creation."""
    query = select(Connector).where(Connector.host_id == host_id, Connector.type.in_(routes))
    return list(db.session.scalars(query.order_by(Connector.priority, Connector.created_at, Connector.id)))


def _existing(host_id: uuid.UUID, key: str) -> Message | None:
    return db.session.scalar(select(Message).where(Message.host_id == host_id, Message.idempotency_key == key))


def _replay(message: Message, digest: str) -> tuple[Message, bool]:
    if message.request_digest != digest:
        raise UnprocessableError(
            "This Idempotency-Key was used with a different request", error_code=IDEMPOTENCY_KEY_REUSED
        )
    return message, False


def create_message(host_id: uuid.UUID, key: str, data: dict[str, Any]) -> tuple[Message, bool]:
    """The message for this key: a new one (True), or the one this key already made (False)."""
    if db.session.get(Host, host_id) is None:
        raise NotFoundError("Host not found")
    digest = _digest(host_id, data)
    existing = _existing(host_id, key)
    if existing is not None:
        return _replay(existing, digest)
    recipient, channels = data["recipient"], data.get("channels")
    routes = _routes(recipient, channels)
    if not _candidates(host_id, routes):
        looked_at = ", ".join(sorted(recipient))
        types = ", ".join(routes) or "none"
        raise UnprocessableError(
            f"No connector of this Host can reach the recipient: addresses given: {looked_at}; "
            f"connector types that could reach them{' within channels' if channels else ''}: {types}",
            error_code=NO_ROUTE,
        )
    now = utcnow()
    purpose = data["purpose"]
    message = Message(
        id=uuid.uuid4(),
        host_id=host_id,
        idempotency_key=key,
        request_digest=digest,
        purpose=purpose,
        status=QUEUED,
        routes=routes,
        recipient_masked={
            field: next(kind.mask for kind in CHANNELS.values() if kind.recipient_field == field)(address)
            for field, address in recipient.items()
        },
        round=1,
        due_at=now,
        expires_at=now + timedelta(seconds=data.get("expires_in") or DEFAULT_EXPIRES_IN[purpose]),
        created_at=now,
    )
    body = {
        "subject": data.get("subject") or SUBJECTS[purpose],
        "text": data["text"],
        "html": data.get("html"),
        "recipient": recipient,
    }
    sealed = keyring().seal(host_id, message.id, body)
    message.body_key_id, message.body_sealed = sealed.key_id, sealed.ciphertext
    db.session.add(message)
    try:
        db.session.commit()
    except IntegrityError:  # the same key, at the same moment, from another request
        db.session.rollback()
        existing = _existing(host_id, key)
        if existing is None:
            raise
        return _replay(existing, digest)
    return message, True


def get_message(message_id: uuid.UUID) -> Message:
    message = db.session.get(Message, message_id)
    if message is None:
        raise NotFoundError("Message not found")
    return message


def list_messages(host_id: uuid.UUID, status: str | None, limit: int) -> list[Message]:
    if db.session.get(Host, host_id) is None:
        raise NotFoundError("Host not found")
    query = select(Message).where(Message.host_id == host_id)
    if status:
        query = query.where(Message.status == status)
    return list(db.session.scalars(query.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit)))


def attempts_of(message_id: uuid.UUID) -> list[DeliveryAttempt]:
    return attempts_by_message([message_id])[message_id]


def attempts_by_message(message_ids: list[uuid.UUID]) -> defaultdict[uuid.UUID, list[DeliveryAttempt]]:
    """The attempts of several messages in one query, each message's oldest first."""
    found: defaultdict[uuid.UUID, list[DeliveryAttempt]] = defaultdict(list)
    if message_ids:
        query = select(DeliveryAttempt).where(DeliveryAttempt.message_id.in_(message_ids))
        for attempt in db.session.scalars(query.order_by(DeliveryAttempt.created_at, DeliveryAttempt.id)):
            found[attempt.message_id].append(attempt)
    return found


def views(messages: list[Message]) -> list[dict[str, Any]]:
    """A page of messages as the API shows them; their attempts read in one query, not one per message."""
    attempts = attempts_by_message([message.id for message in messages])
    return [view(message, attempts[message.id]) for message in messages]


def view(message: Message, attempts: list[DeliveryAttempt] | None = None) -> dict[str, Any]:
    """The message as the API shows it: state and attempts, never its words or full addresses."""
    return {
        "id": message.id,
        "host_id": message.host_id,
        "purpose": message.purpose,
        "status": message.status,
        "created_at": message.created_at,
        "expires_at": message.expires_at,
        "delivered_at": message.delivered_at,
        "delivered_via": message.delivered_via,
        "attempts": attempts_of(message.id) if attempts is None else attempts,
    }


# --- the worker's side -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SendStep:
    message_id: uuid.UUID
    connector_id: uuid.UUID
    connector_type: str
    round: int


@dataclass(frozen=True)
class SendJob:
    attempt_id: uuid.UUID
    message_id: uuid.UUID
    connector_id: uuid.UUID
    connector_type: str
    config: dict[str, Any]
    sealed: bytes  # the config as sealed when claimed: a verdict counts only for that config
    destination: str
    message: OutgoingMessage
    expires_at: datetime


def _lock(message_id: uuid.UUID, *conditions: Any) -> Message | None:
    """The unfinished message, with its row locked until commit (a write takes the row lock on PostgreSQL and
    the write lock on SQLite alike), or None (the caller ends its transaction). One round trip: the ORM loads
    the row the UPDATE returns."""
    return db.session.scalars(
        update(Message)
        .where(Message.id == message_id, Message.status.in_(IN_FLIGHT), *conditions)
        .values(updated_at=utcnow())
        .returning(Message),
        execution_options={"populate_existing": True},
    ).first()


def _finish(message: Message, status: str, now: datetime, via: tuple[uuid.UUID, str] | None = None) -> None:
    """A final status: nothing more will be sent, so the words and full addresses are erased."""
    message.status = status
    message.due_at = None
    message.body_key_id = message.body_sealed = None
    if via is not None:
        message.delivered_at = now
        message.delivered_via_connector_id, message.delivered_via_type = via
    log.info("message %s: %s", message.id, status, extra={"fields": {"message_id": str(message.id), "status": status}})
    emit(
        f"message.{status}",
        message.host_id,
        {
            "host_id": message.host_id,
            "message_id": message.id,
            "status": status,
            "delivered_via": message.delivered_via,
        },
    )


def _backoff(finished_round: int) -> float:
    """Exponential from DISPATCH_RETRY_BASE, capped at DISPATCH_RETRY_MAX, with jitter so that messages
    that failed together do not come back together."""
    config = current_app.config
    delay = min(config["DISPATCH_RETRY_MAX"], config["DISPATCH_RETRY_BASE"] * 2 ** (finished_round - 1))
    return delay * random.uniform(0.8, 1.2)


def advance(message_id: uuid.UUID) -> SendStep | None:
    """Decide what the message does next; the send to make, if any (its job is the caller's to queue)."""
    message = _lock(message_id)
    if message is None:
        db.session.rollback()
        return None
    now = utcnow()
    attempts = attempts_of(message_id)
    for attempt in attempts:
        if attempt.status != ATTEMPT_SENDING:
            continue
        if attempt.deadline_at is not None and attempt.deadline_at > now:  # in flight: its outcome will come
            message.due_at = attempt.deadline_at
            db.session.commit()
            return None
        # The worker died during the provider call: it may have been sent. Not again through this connector;
        # a second channel is better than silence.
        attempt.status, attempt.error_code, attempt.finished_at = UNKNOWN, UNKNOWN_CODE, now
        attempt.message = "the worker stopped during the provider call; the message may have been sent"
    if now >= message.expires_at:
        _finish(message, EXPIRED, now)
        db.session.commit()
        announce()
        return None
    out = {a.connector_id for a in attempts if a.status == UNKNOWN or a.error_code in OUT_FOR_GOOD}
    live = [connector for connector in _candidates(message.host_id, message.routes) if connector.id not in out]
    if not live:
        _finish(message, FAILED, now)
        db.session.commit()
        announce()
        return None
    if message.due_at is not None and message.due_at > now and message.status in (RETRYING, SENDING):
        db.session.commit()  # waiting for the next round, or for a send job already queued
        return None
    tried = {a.connector_id for a in attempts if a.round == message.round}
    following = next((connector for connector in live if connector.id not in tried), None)
    if following is None:  # every live candidate failed for now: the next round after a backoff
        message.round += 1
        start = now + timedelta(seconds=_backoff(message.round - 1))
        if message.not_before is not None:
            start = max(start, message.not_before)
        message.status, message.due_at = RETRYING, min(start, message.expires_at)
        db.session.commit()
        return None
    message.status = SENDING
    # If the send job is lost, the sweep finds the message due again then (or at its expiry).
    message.due_at = min(now + timedelta(seconds=_lease_seconds() * 2), message.expires_at)
    db.session.commit()
    return SendStep(message.id, following.id, following.type, message.round)


def _lease_seconds() -> float:
    return 2 * current_app.config["PROVIDER_TIMEOUT"]


def claim_send(message_id: uuid.UUID, connector_id: uuid.UUID, round_: int) -> SendJob | None:
    """Record the attempt before the provider call; None when this send is no longer to be made."""
    message = _lock(message_id, Message.status == SENDING, Message.round == round_)
    if message is None:
        db.session.rollback()
        return None
    now = utcnow()
    connector = db.session.get(Connector, connector_id)
    open_attempt = db.session.scalar(
        select(DeliveryAttempt.id).where(
            DeliveryAttempt.message_id == message_id, DeliveryAttempt.status == ATTEMPT_SENDING
        )
    )
    left = (message.expires_at - now).total_seconds()
    if connector is None or connector.host_id != message.host_id or open_attempt is not None or left < MIN_SEND_SECONDS:
        message.due_at = now  # let `advance` take it from here
        db.session.commit()
        return None
    kind = channel(connector.type)
    try:
        body = keyring().open(
            message.host_id, message.id, Sealed(message.body_key_id or "", message.body_sealed or b"")
        )
        config = open_config(connector)
    except Exception as exc:  # a key removed from OLD_MASTER_KEYS, say: not this connector, go on to the next
        log.error("message %s: cannot prepare %s: %s", message.id, connector.id, type(exc).__name__)
        db.session.add(
            DeliveryAttempt(
                id=uuid.uuid4(), kind=MESSAGE, message_id=message.id, connector_id=connector.id,
                connector_type=connector.type, round=round_, status=ATTEMPT_FAILED, error_code=WORKER_ERROR,
                message="the worker could not open this connector's sealed settings", created_at=now, finished_at=now,
            )
        )  # fmt: skip
        message.due_at = now
        db.session.commit()
        return None
    destination = body["recipient"][kind.recipient_field]
    lease = min(_lease_seconds(), left + 1)
    attempt = DeliveryAttempt(
        id=uuid.uuid4(),
        kind=MESSAGE,
        message_id=message.id,
        connector_id=connector.id,
        connector_type=connector.type,
        round=round_,
        destination=kind.mask(destination),
        status=ATTEMPT_SENDING,
        created_at=now,
        deadline_at=now + timedelta(seconds=lease),
    )
    message.due_at = attempt.deadline_at
    db.session.add(attempt)
    job = SendJob(
        attempt_id=attempt.id,
        message_id=message.id,
        connector_id=connector.id,
        connector_type=connector.type,
        config=config,
        sealed=connector.config_sealed,
        destination=destination,
        message=OutgoingMessage(subject=body["subject"], text=body["text"], html=body.get("html")),
        expires_at=message.expires_at,
    )
    try:
        db.session.commit()
    except IntegrityError:  # this connector was already tried in this round: at most once
        db.session.rollback()
        return None
    return job


def finish_send(job: SendJob, outcome: Outcome, retry_after: float | None = None) -> bool:
    """Record the outcome; True when the message still needs a next step."""
    now = utcnow()
    message = _lock(job.message_id)  # first, as advance does: the same lock order everywhere
    if outcome.is_verdict:
        lock_for_verdict(job.connector_id)
    db.session.execute(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == job.attempt_id, DeliveryAttempt.status.in_([ATTEMPT_SENDING, UNKNOWN]))
        .values(
            status=SENT if outcome.success else ATTEMPT_FAILED,
            error_code=outcome.error_code,
            message=outcome.message,
            delivery_time_ms=outcome.delivery_time_ms,
            finished_at=now,
        )
    )
    if outcome.is_verdict:
        record_verdict(job.connector_id, job.sealed, outcome.success, outcome.error_code, outcome.message)
    if message is None:  # already final (expired meanwhile, or delivered through another channel)
        db.session.commit()
        announce()
        return False
    if outcome.success:
        _finish(message, DELIVERED, now, via=(job.connector_id, job.connector_type))
        db.session.commit()
        announce()
        return False
    message.due_at = now
    if retry_after:
        hint = now + timedelta(seconds=retry_after)
        message.not_before = max(message.not_before or hint, hint)
    db.session.commit()
    announce()
    return True


def due_messages(limit: int = 500) -> list[uuid.UUID]:
    """Unfinished messages whose due time has come: their job was lost, their round is due, or they expired.
    (A message queued twice is harmless: `advance` decides under the row lock.)"""
    query = select(Message.id).where(Message.status.in_(IN_FLIGHT), Message.due_at <= utcnow())
    return list(db.session.scalars(query.order_by(Message.due_at).limit(limit)))
