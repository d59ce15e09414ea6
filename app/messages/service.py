"""Dispatch, the API's side: a message taken in (idempotently), and what became of it (never its words).

Creating a message commits it with its next due time before the 202, then queues its first step; the worker's
side is `app.messages.dispatch`.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.attempts import DeliveryAttempt
from app.auth.models import Host
from app.auth.service import digest_key
from app.channels import CHANNELS
from app.channels.base import text_length
from app.connectors.models import Connector
from app.connectors.service import keyring
from app.crypto import RequestDigest
from app.errors import CONFIRM_UNAVAILABLE, IDEMPOTENCY_KEY_REUSED, NO_ROUTE, NotFoundError, UnprocessableError
from app.extensions import db
from app.messages.models import OTP, QUEUED, Message
from app.queues import ADVANCE_MESSAGE, DISPATCH_QUEUE, OTP_QUEUE, nudge
from app.timeutil import db_now

SUBJECTS = {
    "otp": "Your BAPBA code",
    "notification": "A message from BAPBA",
    "liveness": "BAPBA: please confirm you are still with us",
}
DEFAULT_EXPIRES_IN = {"otp": 600, "notification": 7 * 86400, "liveness": 7 * 86400}


def advance_queue(purpose: str) -> str:
    """Where a message's decisions run: one-time codes apart, so they never wait behind a flood of notifications."""
    return OTP_QUEUE if purpose == OTP else DISPATCH_QUEUE


def send_queue(purpose: str, connector_type: str) -> str:
    """Where a message's provider calls run: one-time codes apart, the rest on their connector type's queue."""
    return OTP_QUEUE if purpose == OTP else CHANNELS[connector_type].queue


def _digest(host_id: uuid.UUID, data: dict[str, Any]) -> RequestDigest:
    """The request's digest under the Host's digest key, which a rotation re-seals but never changes: a replay
    after a rotation is still recognised. Made first in `create_message`, as `digest_key` asks."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return keyring().request_digest(host_id, digest_key(host_id), canonical)


def _routes(recipient: dict[str, str], channels: list[str] | None, text: str) -> tuple[list[str], list[str]]:
    """The connector types that can take this message (and are in `channels`), and those left out only because
    the text is longer than their provider takes."""
    reaching = [
        name
        for name, kind in CHANNELS.items()
        if kind.recipient_field in recipient and (channels is None or name in channels)
    ]
    return [name for name in reaching if CHANNELS[name].takes(text)], [
        name for name in reaching if not CHANNELS[name].takes(text)
    ]


def candidates(host_id: uuid.UUID, routes: list[str]) -> list[Connector]:
    """The Host's connectors that can reach the recipient, in the list's order: priority, then creation."""
    query = select(Connector).where(Connector.host_id == host_id, Connector.type.in_(routes))
    return list(db.session.scalars(query.order_by(Connector.priority, Connector.created_at, Connector.id)))


def _existing(host_id: uuid.UUID, key: str) -> Message | None:
    return db.session.scalar(select(Message).where(Message.host_id == host_id, Message.idempotency_key == key))


def _replay(message: Message, digest: RequestDigest) -> tuple[Message, bool]:
    if not digest.matches(message.request_digest):
        raise UnprocessableError(
            "This Idempotency-Key was used with a different request", error_code=IDEMPOTENCY_KEY_REUSED
        )
    return message, False


def _no_route(
    recipient: dict[str, str], channels: list[str] | None, routes: list[str], too_long_for: list[str], text: str
) -> str:
    """What is missing, not only what was looked at: a Host with no connector at all must not read as a
    contradiction."""
    missing = []
    if routes:
        within = " within channels" if channels else ""
        missing.append(f"this Host has no connector of type {', '.join(routes)}{within}")
    if too_long_for:
        limits = ", ".join(f"{name} takes {CHANNELS[name].max_text:,}" for name in too_long_for)
        missing.append(f"the text is {text_length(text):,} characters long and {limits}")
    if not missing:
        missing.append("no connector type within channels can reach them")
    given = ", ".join(sorted(recipient))
    return f"No connector of this Host can reach the recipient at the addresses given ({given}): {'; '.join(missing)}"


def create_message(host_id: uuid.UUID, key: str, data: dict[str, Any]) -> tuple[Message, bool]:
    """The message for this key: a new one (True), committed and its first step queued, or the one this key
    already made (False)."""
    if db.session.get(Host, host_id) is None:
        raise NotFoundError("Host not found")
    digest = _digest(host_id, data)
    existing = _existing(host_id, key)
    if existing is not None:
        return _replay(existing, digest)
    confirm = data.get("confirm")
    if confirm and not current_app.config["PUBLIC_BASE_URL"]:
        raise UnprocessableError(
            "Confirmation needs PUBLIC_BASE_URL: without a public address no provider can send receipts",
            error_code=CONFIRM_UNAVAILABLE,
        )
    recipient, channels = data["recipient"], data.get("channels")
    routes, too_long_for = _routes(recipient, channels, data["text"])
    if not candidates(host_id, routes):
        raise UnprocessableError(
            _no_route(recipient, channels, routes, too_long_for, data["text"]), error_code=NO_ROUTE
        )
    now = db_now()
    purpose = data["purpose"]
    message = Message(
        id=uuid.uuid4(),
        host_id=host_id,
        idempotency_key=key,
        request_digest=digest.value,
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
        confirm_by=confirm["by"] if confirm else None,
        confirm_within=confirm["within"] if confirm else None,
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
    # Its first step, queued now; the sweep takes it if the broker cannot.
    nudge(ADVANCE_MESSAGE, str(message.id), queue=advance_queue(purpose))
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
