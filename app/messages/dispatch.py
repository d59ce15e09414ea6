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
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import func, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from app.attempts import FAILED as ATTEMPT_FAILED
from app.attempts import MESSAGE, RECEIPT_DELIVERED, RECEIPT_READ, RECEIPT_UNDELIVERED, UNKNOWN, DeliveryAttempt
from app.attempts import SENDING as ATTEMPT_SENDING
from app.attempts import SENT as SENT_ATTEMPT
from app.channels import channel
from app.channels.base import OutgoingMessage
from app.channels.sms import mask_phone
from app.connectors.models import Connector
from app.connectors.service import keyring, open_config
from app.crypto import Sealed
from app.deliveries.jobs import MESSAGE_LIMIT, MIN_SEND_SECONDS, RECORD_RETRY_SECONDS, Job, Ran, perform, write_outcome
from app.errors import with_database_retry
from app.events.service import announce, emit
from app.extensions import db
from app.messages.models import (
    DELIVERED,
    EXPIRED,
    FAILED,
    IN_FLIGHT,
    OTP,
    QUEUED,
    RETRYING,
    SENDING,
    SENT,
    UNCONFIRMED,
    Message,
)
from app.messages.models import UNKNOWN as MESSAGE_UNKNOWN
from app.messages.service import advance_queue, attempts_of, candidates, send_queue
from app.outcomes import PERMANENT, UNDELIVERED, WORKER_ERROR, Outcome
from app.outcomes import UNKNOWN as UNKNOWN_CODE
from app.queues import ADVANCE_MESSAGE, SEND_MESSAGE, nudge
from app.timeutil import db_now, utcnow

log = logging.getLogger(__name__)

# A connector that failed for one of these is not tried again for this message: trying again cannot mend it.
OUT_FOR_GOOD = PERMANENT | {WORKER_ERROR}
# Receipts that confirm a message asked to be confirmed.
CONFIRMING = (RECEIPT_DELIVERED, RECEIPT_READ)
# A round due later than this is left to the sweep: a worker holds a job with a countdown in memory until then.
MAX_COUNTDOWN_SECONDS = 300.0


@dataclass(frozen=True)
class SendStep:
    message_id: uuid.UUID
    connector_id: uuid.UUID
    connector_type: str
    round: int
    queue: str


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
    message.finished_at = now
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
    # The exponent is capped: past it the delay is DISPATCH_RETRY_MAX anyway, and 2 ** 1024 overflows a float.
    delay = min(config["DISPATCH_RETRY_MAX"], config["DISPATCH_RETRY_BASE"] * 2 ** min(finished_round - 1, 40))
    return delay * random.uniform(0.8, 1.2)


def _lease_seconds() -> float:
    return 2 * current_app.config["PROVIDER_TIMEOUT"]


@dataclass(frozen=True)
class Next:
    """What `advance` decided, for its caller to queue after the commit."""

    message_id: uuid.UUID
    queue: str  # where the message's next decision runs (OTPs have a queue of their own)
    send: SendStep | None = None  # a provider call to make now
    look_again_in: float | None = None  # seconds until the message is due again (a round's backoff)
    freed_host: uuid.UUID | None = None  # a Host's notification stopped sending: its next waiting one may start


# The key space of the Hosts' dispatch locks (pg_advisory_xact_lock's two-key form); the events' lock is (0, x).
HOST_DISPATCH_LOCKS = 0x686F7374


def _in_flight(host_id: uuid.UUID) -> int:
    """The Host's notifications and liveness checks being sent right now (OTPs are not counted, nor held).

    On PostgreSQL the count is taken under a lock of the Host's own, held to the commit, so that two workers
    starting two of its messages at once cannot both see room for one. It is the last lock its holder takes
    (it only writes its message, already locked, after it), so it cannot close a circle of waits."""
    if db.session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(host_id.bytes[:4], "big", signed=True)
        db.session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": HOST_DISPATCH_LOCKS, "key": key}
        )
    query = select(func.count()).where(Message.host_id == host_id, Message.status == SENDING, Message.purpose != OTP)
    return db.session.scalar(query) or 0


def advance(message_id: uuid.UUID) -> Next | None:
    """Decide what the message does next; its jobs are the caller's to queue (`Next`)."""
    message = _lock(message_id)
    if message is None:
        db.session.rollback()
        return None
    now = db_now()
    queue = advance_queue(message.purpose)
    was_sending = message.status == SENDING and message.purpose != OTP
    freed = message.host_id if was_sending else None
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
    maybe_sent = any(a.status == UNKNOWN for a in attempts)  # a provider may have taken it
    # Accepted, but not confirmed by a receipt (a message asked to be confirmed); one confirmed ends it.
    accepted = [a for a in attempts if a.status == SENT_ATTEMPT]
    confirmed = next((a for a in accepted if a.receipt in CONFIRMING), None)
    if message.confirm_by and confirmed is not None:
        _finish(message, DELIVERED, now, via=(confirmed.connector_id, confirmed.connector_type))
        db.session.commit()
        announce()
        return Next(message.id, queue, freed_host=freed)
    unconfirmed = bool(message.confirm_by and accepted)
    if now >= message.expires_at:
        _finish(message, UNCONFIRMED if unconfirmed else MESSAGE_UNKNOWN if maybe_sent else EXPIRED, now)
        db.session.commit()
        announce()
        return Next(message.id, queue, freed_host=freed)
    out = {a.connector_id for a in attempts if a.status == UNKNOWN or a.error_code in OUT_FOR_GOOD}
    if message.confirm_by:  # a channel that took the message and did not confirm it is not asked again
        out |= {a.connector_id for a in accepted}
    live = [connector for connector in candidates(message.host_id, message.routes) if connector.id not in out]
    if not live:
        if unconfirmed:  # every channel tried: a late receipt may still confirm it, until it expires
            message.status, message.due_at = SENT, message.expires_at
            db.session.commit()
            return Next(message.id, queue, look_again_in=(message.due_at - now).total_seconds(), freed_host=freed)
        _finish(message, MESSAGE_UNKNOWN if maybe_sent else FAILED, now)
        db.session.commit()
        announce()
        return Next(message.id, queue, freed_host=freed)
    if message.due_at is not None and message.due_at > now and message.status in (RETRYING, SENDING, SENT):
        db.session.commit()  # waiting for the next round, a receipt, or a send job already queued
        if message.status != SENDING:  # a countdown that ran early (a worker's clock ahead): look again then
            return Next(message.id, queue, look_again_in=(message.due_at - now).total_seconds())
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
        return Next(message.id, queue, look_again_in=(message.due_at - now).total_seconds(), freed_host=freed)
    if not was_sending and message.purpose != OTP and _in_flight(message.host_id) >= _host_concurrency():
        # The Host has as many notifications in flight as it may: this one waits its turn, in the database. The
        # Host's next send to end takes it up; the sweep does, if nothing else has, once it is due again.
        message.status, message.due_at = QUEUED, min(now + timedelta(seconds=_hold_seconds()), message.expires_at)
        db.session.commit()
        return None
    message.status = SENDING
    # If the send job is lost, the sweep finds the message due again then (or at its expiry).
    message.due_at = min(now + timedelta(seconds=_lease_seconds() * 2), message.expires_at)
    db.session.commit()
    step = SendStep(
        message.id, following.id, following.type, message.round, send_queue(message.purpose, following.type)
    )
    return Next(message.id, queue, send=step)


def _host_concurrency() -> int:
    return current_app.config["DISPATCH_HOST_CONCURRENCY"]


def _hold_seconds() -> float:
    return 2 * current_app.config["SWEEP_INTERVAL"]


def advance_and_queue(message_id: uuid.UUID) -> None:
    """`advance`, then queue what it decided: the send on its queue, the next look at a message whose round is
    to start after a backoff (so rounds go on without beat), and the Host's next waiting notification."""
    after = with_database_retry("advance", lambda: advance(message_id), seconds=RECORD_RETRY_SECONDS)
    if after is None:
        return
    if after.send is not None:
        step = after.send
        nudge(SEND_MESSAGE, str(step.message_id), str(step.connector_id), step.round, queue=step.queue)
    if after.look_again_in is not None and after.look_again_in <= MAX_COUNTDOWN_SECONDS:
        nudge(ADVANCE_MESSAGE, str(after.message_id), queue=after.queue, countdown=max(after.look_again_in, 0))
    if after.freed_host is not None:
        take_next_waiting(after.freed_host)


def take_next_waiting(host_id: uuid.UUID) -> None:
    """A slot of the Host's notifications came free: the oldest of those waiting their turn is taken up."""
    waiting = db.session.scalar(
        select(Message.id)
        .where(Message.host_id == host_id, Message.status == QUEUED, Message.purpose != OTP)
        .order_by(Message.created_at, Message.id)
        .limit(1)
    )
    db.session.rollback()
    if waiting is not None:
        nudge(ADVANCE_MESSAGE, str(waiting))


def claim_send(message_id: uuid.UUID, connector_id: uuid.UUID, round_: int) -> Job | None:
    """Record the attempt before the provider call; None when this send is no longer to be made."""
    message = _lock(message_id, Message.status == SENDING, Message.round == round_)
    if message is None:
        db.session.rollback()
        return None
    now = db_now()
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
        host_id=message.host_id,
        queue=advance_queue(message.purpose),
        confirmable=kind.callback_url(current_app.config["PUBLIC_BASE_URL"], connector.id, config) is not None,
    )
    try:
        db.session.commit()
    except IntegrityError:  # tried already in this round (at most once), or the connector deleted meanwhile
        db.session.rollback()
        db.session.execute(update(Message).where(Message.id == message_id).values(due_at=db_now()))
        db.session.commit()  # let `advance` take it from here, now
        return None
    return job


def record_send(job: Job, outcome: Outcome) -> float | None:
    """Record a send's outcome and move the message on: None when it needs nothing more (final), else the
    seconds until its next step is due (0: at once; more: a receipt awaited until then)."""
    now = db_now()
    message = _lock(job.message_id)  # first, as advance does: the same lock order everywhere
    write_outcome(job.attempt_id, job, outcome, now)
    if message is None:  # already final (expired meanwhile, or delivered through another channel)
        db.session.commit()
        announce()
        return None
    if outcome.success and message.confirm_by and job.confirmable:
        # Accepted is not confirmed: a receipt must say it reached the phone within `confirm_within`.
        message.status = SENT
        message.due_at = min(now + timedelta(seconds=message.confirm_within or 0), message.expires_at)
        db.session.commit()
        announce()
        return (message.due_at - now).total_seconds()
    if outcome.success:
        _finish(message, DELIVERED, now, via=(job.connector_id, job.connector_type))
        db.session.commit()
        announce()
        return None
    message.due_at = now
    if outcome.retry_after:
        hint = now + timedelta(seconds=outcome.retry_after)
        message.not_before = max(message.not_before or hint, hint)
    db.session.commit()
    announce()
    return 0.0


def send(message_id: uuid.UUID, connector_id: uuid.UUID, round_: int) -> Ran:
    """One provider call for one message through one connector: claimed, made, recorded, and the message
    advanced when it needs a next step."""
    job = with_database_retry(
        "claim", lambda: claim_send(message_id, connector_id, round_), seconds=RECORD_RETRY_SECONDS
    )
    if job is None:  # no longer to be made (already made, expired, connector gone): let advance decide
        purpose = db.session.scalar(select(Message.purpose).where(Message.id == message_id))
        db.session.rollback()
        if purpose is not None:
            nudge(ADVANCE_MESSAGE, str(message_id), queue=advance_queue(purpose))
        return Ran(None, "skipped")
    outcome = perform(job)
    label = "sent" if outcome.success else str(outcome.error_code)
    try:
        due_in = with_database_retry("record", lambda: record_send(job, outcome), seconds=RECORD_RETRY_SECONDS)
    except Exception as exc:  # the lease runs out and advance closes the attempt as unknown
        log.error("could not record the outcome of message %s: %s", message_id, type(exc).__name__)
        return Ran(outcome, label, job)
    if due_in is None and job.host_id is not None:  # final: its place among the Host's sends is free
        take_next_waiting(job.host_id)
    elif due_in is not None and due_in <= 0:
        nudge(ADVANCE_MESSAGE, str(message_id), queue=job.queue)
    elif due_in is not None:  # waiting for a receipt, which frees its place; the next look is queued
        if due_in <= MAX_COUNTDOWN_SECONDS:
            nudge(ADVANCE_MESSAGE, str(message_id), queue=job.queue, countdown=due_in)
        if job.host_id is not None:
            take_next_waiting(job.host_id)
    return Ran(outcome, label, job)


def due_messages(limit: int = 500) -> list[tuple[uuid.UUID, str]]:
    """Unfinished messages whose due time has come, with their purpose: their job was lost, their round is due,
    they wait their turn, or they expired. At most DISPATCH_HOST_CONCURRENCY of one Host, so that one Host's
    backlog cannot take a sweep's whole batch. (A message queued twice is harmless: `advance` decides under the
    row lock.)"""
    rank = func.row_number().over(partition_by=Message.host_id, order_by=(Message.due_at, Message.id))
    ranked = (
        select(Message.id, Message.purpose, Message.due_at, rank.label("turn"))
        .where(Message.status.in_(IN_FLIGHT), Message.due_at <= db_now())
        .subquery()
    )
    # One-time codes are never held back by their own Host's waiting notifications.
    query = select(ranked.c.id, ranked.c.purpose).where(
        or_(ranked.c.turn <= _host_concurrency(), ranked.c.purpose == OTP)
    )
    return [(row.id, row.purpose) for row in db.session.execute(query.order_by(ranked.c.due_at).limit(limit))]


# Receipts a later one may replace: they only move forward (delivered < read; undelivered only from none).
_REPLACEABLE = {
    RECEIPT_UNDELIVERED: (None,),
    RECEIPT_DELIVERED: (None, RECEIPT_UNDELIVERED),
    RECEIPT_READ: (None, RECEIPT_UNDELIVERED, RECEIPT_DELIVERED),
}
_PHONE_NUMBER = re.compile(r"\+?[0-9][0-9 ()-]{6,}[0-9]")


def record_receipt(connector_id: uuid.UUID, provider_message_id: str, receipt: str, detail: str | None) -> bool:
    """A provider's receipt for what it accepted through this connector (found by the provider's id): recorded on
    the attempt, forward only. For a message waiting to be confirmed, `delivered` or `read` delivers it and
    `undelivered` tries the next channel at once. False when no attempt of this connector has that id."""
    now = db_now()
    found = db.session.execute(
        select(DeliveryAttempt.id, DeliveryAttempt.message_id)
        .where(DeliveryAttempt.connector_id == connector_id, DeliveryAttempt.provider_message_id == provider_message_id)
        .order_by(DeliveryAttempt.created_at.desc())
        .limit(1)
    ).first()
    if found is None:
        db.session.rollback()
        return False
    message = _lock(found.message_id) if found.message_id is not None else None  # the message first, as ever
    values: dict[str, Any] = {"receipt": receipt, "receipt_at": now}
    if receipt == RECEIPT_UNDELIVERED:
        # The provider's code and words; a number it quotes (the recipient's) is masked.
        words = _PHONE_NUMBER.sub(lambda number: mask_phone(number.group(0)), (detail or "")[:MESSAGE_LIMIT])
        values |= {"error_code": UNDELIVERED, "message": f"the provider could not deliver it: {words}".strip(": ")}
    moved = db.session.execute(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == found.id, _receipt_may_become(receipt))
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    next_step = False
    if moved and message is not None and message.confirm_by:
        if receipt in CONFIRMING:
            connector_type = db.session.scalar(
                select(DeliveryAttempt.connector_type).where(DeliveryAttempt.id == found.id)
            )
            _finish(message, DELIVERED, now, via=(connector_id, connector_type or ""))
        elif message.status == SENT:  # the channel it waited on says no: the next one, now
            message.due_at = now
            next_step = True
    db.session.commit()
    announce()
    if next_step and message is not None:
        nudge(ADVANCE_MESSAGE, str(message.id), queue=advance_queue(message.purpose))
    return True


def _receipt_may_become(receipt: str) -> Any:
    allowed = _REPLACEABLE[receipt]
    condition = DeliveryAttempt.receipt.in_([value for value in allowed if value is not None])
    return or_(DeliveryAttempt.receipt.is_(None), condition) if None in allowed else condition
