"""Dispatch, the worker's side: a message's state machine, its sends, and the messages the sweep must look at.

The database is the source of truth; jobs only carry ids and only speed up what the rows already say. `advance`
decides the next step under the message's row lock; `claim_send` records the attempt before the provider call
(so a connector is tried at most once per round, and never twice after a worker died mid-call); the call and
its record take the one road of `app.deliveries.jobs`, and `record_send` moves the message on. The sweep (Celery
beat) advances every message that is due, whatever job was lost.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from app.attempts import FAILED as ATTEMPT_FAILED
from app.attempts import MESSAGE, UNKNOWN, DeliveryAttempt
from app.attempts import SENDING as ATTEMPT_SENDING
from app.channels import channel
from app.channels.base import OutgoingMessage
from app.connectors.models import Connector
from app.connectors.service import keyring, open_config
from app.crypto import Sealed
from app.deliveries.jobs import MIN_SEND_SECONDS, RECORD_RETRY_SECONDS, Job, Ran, perform, write_outcome
from app.errors import with_database_retry
from app.events.service import announce, emit
from app.extensions import db
from app.messages.models import DELIVERED, EXPIRED, FAILED, IN_FLIGHT, RETRYING, SENDING, Message
from app.messages.service import attempts_of, candidates
from app.outcomes import PERMANENT, WORKER_ERROR, Outcome
from app.outcomes import UNKNOWN as UNKNOWN_CODE
from app.queues import ADVANCE_MESSAGE, SEND_MESSAGE, nudge
from app.timeutil import utcnow

log = logging.getLogger(__name__)

# A connector that failed for one of these is not tried again for this message: trying again cannot mend it.
OUT_FOR_GOOD = PERMANENT | {WORKER_ERROR}


@dataclass(frozen=True)
class SendStep:
    message_id: uuid.UUID
    connector_id: uuid.UUID
    connector_type: str
    round: int


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


def _lease_seconds() -> float:
    return 2 * current_app.config["PROVIDER_TIMEOUT"]


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
    live = [connector for connector in candidates(message.host_id, message.routes) if connector.id not in out]
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


def advance_and_queue(message_id: uuid.UUID) -> None:
    """`advance`, then queue the send it chose on the connector type's queue."""
    step = with_database_retry("advance", lambda: advance(message_id), seconds=RECORD_RETRY_SECONDS)
    if step is not None:
        nudge(SEND_MESSAGE, str(step.message_id), str(step.connector_id), step.round, queue=step.connector_type)


def claim_send(message_id: uuid.UUID, connector_id: uuid.UUID, round_: int) -> Job | None:
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
    job = Job(
        attempt_id=attempt.id,
        kind=MESSAGE,
        connector_id=connector.id,
        connector_type=connector.type,
        config=config,
        sealed=connector.config_sealed,
        deadline=time.monotonic() + left,  # nothing is sent after expires_at
        destination=destination,
        message=OutgoingMessage(subject=body["subject"], text=body["text"], html=body.get("html")),
        message_id=message.id,
    )
    try:
        db.session.commit()
    except IntegrityError:  # this connector was already tried in this round: at most once
        db.session.rollback()
        return None
    return job


def record_send(job: Job, outcome: Outcome) -> bool:
    """Record a send's outcome and move the message on; True when the message still needs a next step."""
    now = utcnow()
    message = _lock(job.message_id)  # first, as advance does: the same lock order everywhere
    write_outcome(job.attempt_id, job, outcome)
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
    if outcome.retry_after:
        hint = now + timedelta(seconds=outcome.retry_after)
        message.not_before = max(message.not_before or hint, hint)
    db.session.commit()
    announce()
    return True


def send(message_id: uuid.UUID, connector_id: uuid.UUID, round_: int) -> Ran:
    """One provider call for one message through one connector: claimed, made, recorded, and the message
    advanced when it needs a next step."""
    job = with_database_retry(
        "claim", lambda: claim_send(message_id, connector_id, round_), seconds=RECORD_RETRY_SECONDS
    )
    if job is None:  # no longer to be made (already made, expired, connector gone): let advance decide
        nudge(ADVANCE_MESSAGE, str(message_id))
        return Ran(None, "skipped")
    outcome = perform(job)
    label = "sent" if outcome.success else str(outcome.error_code)
    try:
        more = with_database_retry("record", lambda: record_send(job, outcome), seconds=RECORD_RETRY_SECONDS)
    except Exception as exc:  # the lease runs out and advance closes the attempt as unknown
        log.error("could not record the outcome of message %s: %s", message_id, type(exc).__name__)
        return Ran(outcome, label, job)
    if more:
        nudge(ADVANCE_MESSAGE, str(message_id))
    return Ran(outcome, label, job)


def due_messages(limit: int = 500) -> list[uuid.UUID]:
    """Unfinished messages whose due time has come: their job was lost, their round is due, or they expired.
    (A message queued twice is harmless: `advance` decides under the row lock.)"""
    query = select(Message.id).where(Message.status.in_(IN_FLIGHT), Message.due_at <= utcnow())
    return list(db.session.scalars(query.order_by(Message.due_at).limit(limit)))
