"""The sweep, beat's safety net every SWEEP_INTERVAL: what no job will do, because a job was lost or its worker
died. Idempotent, so two beats by mistake do no harm."""

from __future__ import annotations

from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import delete, select, update

from app.attempts import PENDING, SENDING, TIMEOUT, UNKNOWN, DeliveryAttempt
from app.events.models import Event
from app.events.service import has_due
from app.extensions import db
from app.messages.dispatch import due_messages
from app.outcomes import TIMEOUT as TIMEOUT_CODE
from app.outcomes import UNKNOWN as UNKNOWN_CODE
from app.queues import ADVANCE_MESSAGE, DELIVER_EVENTS, nudge
from app.timeutil import utcnow


def close_overdue(now: datetime | None = None) -> int:
    """Close every attempt still open past its deadline: nobody waits for it any more."""
    now = now or utcnow()
    count = 0
    while True:
        # Rows another transaction holds (a delete, an outcome being recorded) are left to the next sweep:
        # waiting for them while holding others could close a circle of waits.
        overdue = db.session.scalars(
            select(DeliveryAttempt.id)
            .where(DeliveryAttempt.status.in_([PENDING, SENDING]), DeliveryAttempt.deadline_at < now)
            .order_by(DeliveryAttempt.id)
            .limit(500)
            .with_for_update(skip_locked=True)
        ).all()
        if not overdue:
            break
        for status, closed_as, code, text in (
            (PENDING, TIMEOUT, TIMEOUT_CODE, "no worker started the test before its deadline"),
            (SENDING, UNKNOWN, UNKNOWN_CODE, "the worker stopped during the provider call; it may have gone through"),
        ):
            count += db.session.execute(
                update(DeliveryAttempt)
                .where(DeliveryAttempt.id.in_(overdue), DeliveryAttempt.status == status)
                .values(status=closed_as, error_code=code, message=text, finished_at=now)
            ).rowcount
    db.session.commit()
    return count


def prune_events() -> int:
    """Forget events older than EVENTS_RETENTION: pollers and receivers have had them (or gave up)."""
    cutoff = utcnow() - timedelta(seconds=current_app.config["EVENTS_RETENTION"])
    removed = db.session.execute(delete(Event).where(Event.created_at < cutoff)).rowcount
    db.session.commit()
    return removed


def sweep() -> dict[str, int]:
    """Close overdue attempts, advance the messages that are due, nudge the events' delivery, prune old events."""
    closed = close_overdue()
    due = due_messages()
    for message_id in due:
        nudge(ADVANCE_MESSAGE, str(message_id))
    if current_app.config["EVENTS_WEBHOOK_URL"] and has_due():
        nudge(DELIVER_EVENTS)
    return {"attempts_closed": closed, "messages_advanced": len(due), "events_pruned": prune_events()}
