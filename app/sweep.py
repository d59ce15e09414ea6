"""The sweep, beat's safety net every SWEEP_INTERVAL: what no job will do, because a job was lost or its worker
died, and retention. Idempotent, so two beats by mistake do no harm."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import and_, delete, or_, select, update

from app.attempts import CHECK, PENDING, SENDING, TEST, TIMEOUT, UNKNOWN, DeliveryAttempt
from app.connectors.models import Connector
from app.events.models import Event
from app.events.service import has_due
from app.extensions import db
from app.messages.dispatch import due_messages
from app.messages.models import Message
from app.messages.service import advance_queue
from app.outcomes import TIMEOUT as TIMEOUT_CODE
from app.outcomes import UNKNOWN as UNKNOWN_CODE
from app.queues import ADVANCE_MESSAGE, DELIVER_EVENTS, nudge
from app.timeutil import db_now

# Retention deletes in short transactions of at most PRUNE_BATCH rows, and at most PRUNE_BATCHES of them per
# sweep for messages and as many for tests and checks: a backlog (the first sweep after an upgrade, a lowered
# setting) drains over several sweeps instead of making one long.
PRUNE_BATCH = 1000
PRUNE_BATCHES = 5
# Tests and checks a connector keeps whatever their age: its recent history, even when it is rarely checked.
KEEP_PROBES = 20
# Connectors whose tests and checks one sweep looks at: what a sweep costs when there is nothing to prune.
PRUNE_CONNECTORS = 2000
PROBES = (TEST, CHECK)


def close_overdue(now: datetime | None = None) -> int:
    """Close every attempt still open past its deadline: nobody waits for it any more."""
    now = now or db_now()
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
                .values(
                    status=closed_as,
                    error_code=code,
                    message=text,
                    finished_at=now,
                    destination_key_id=None,
                    destination_sealed=None,
                )
            ).rowcount
    db.session.commit()
    return count


def prune_events() -> int:
    """Forget events older than EVENTS_RETENTION: pollers and receivers have had them (or gave up)."""
    cutoff = db_now() - timedelta(seconds=current_app.config["EVENTS_RETENTION"])
    removed = db.session.execute(delete(Event).where(Event.created_at < cutoff)).rowcount
    db.session.commit()
    return removed


def prune_messages() -> int:
    """Forget the messages that ended more than MESSAGE_RETENTION ago; their attempts go with them (ON DELETE
    CASCADE). At most PRUNE_BATCHES batches; what is left waits for the next sweep."""
    cutoff = db_now() - timedelta(seconds=current_app.config["MESSAGE_RETENTION"])
    removed = 0
    for _ in range(PRUNE_BATCHES):
        # A row some writer holds is left for the next sweep rather than waited for.
        candidates = db.session.execute(
            select(Message.id, Message.round)
            .where(Message.finished_at < cutoff)
            .order_by(Message.finished_at)
            .limit(PRUNE_BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        # A message tried for days (a provider down) has an attempt or more per round: a batch holds messages
        # up to PRUNE_BATCH rounds in all, so that their attempts cannot make it long.
        ids: list[uuid.UUID] = []
        rounds = 0
        for message_id, message_rounds in candidates:
            if ids and rounds + message_rounds > PRUNE_BATCH:
                break
            ids.append(message_id)
            rounds += message_rounds
        if ids:
            removed += db.session.execute(
                delete(Message).where(Message.id.in_(ids)), execution_options={"synchronize_session": False}
            ).rowcount
        db.session.commit()
        if len(candidates) < PRUNE_BATCH and len(ids) == len(candidates):
            break
    return removed


def _connectors_with_old_probes(cutoff: datetime) -> list[uuid.UUID]:
    """Of PRUNE_CONNECTORS connectors in key order from a random key (wrapping around), those that have a test or
    check older than `cutoff`. Over many sweeps every connector's turn comes, with no state kept; with fewer
    connectors than that, every sweep looks at all. A subquery per connector on the index (connector_id,
    created_at), which stops at the first old one: never a scan of the whole attempt log."""
    start = uuid.UUID(int=random.getrandbits(128))
    found: list[uuid.UUID] = []
    looked_at = 0
    for after_start in (True, False):
        window = (
            select(Connector.id)
            .where(Connector.id >= start if after_start else Connector.id < start)
            .order_by(Connector.id)
            .limit(PRUNE_CONNECTORS - looked_at)
            .subquery()
        )
        oldest = (
            select(DeliveryAttempt.created_at)
            .where(
                DeliveryAttempt.connector_id == window.c.id,
                DeliveryAttempt.created_at < cutoff,
                DeliveryAttempt.kind.in_(PROBES),
            )
            .order_by(DeliveryAttempt.created_at)
            .limit(1)
            .scalar_subquery()
        )
        rows = db.session.execute(select(window.c.id, oldest.is_not(None))).all()
        looked_at += len(rows)
        found += [connector_id for connector_id, has_old in rows if has_old]
        if looked_at >= PRUNE_CONNECTORS:
            break
    return found


def _prunable_probes(connector_id: uuid.UUID, cutoff: datetime, limit: int) -> list[uuid.UUID]:
    """Up to `limit` of the connector's tests and checks older than `cutoff` and not among its latest
    KEEP_PROBES, locked (rows a writer holds are skipped)."""
    keep_from = db.session.execute(
        select(DeliveryAttempt.created_at, DeliveryAttempt.id)
        .where(DeliveryAttempt.connector_id == connector_id, DeliveryAttempt.kind.in_(PROBES))
        .order_by(DeliveryAttempt.created_at.desc(), DeliveryAttempt.id.desc())
        .offset(KEEP_PROBES - 1)
        .limit(1)
    ).first()
    if keep_from is None:  # it has no more than it keeps
        return []
    kept_at, kept_id = keep_from
    return list(
        db.session.scalars(
            select(DeliveryAttempt.id)
            .where(
                DeliveryAttempt.connector_id == connector_id,
                DeliveryAttempt.created_at < cutoff,
                DeliveryAttempt.kind.in_(PROBES),
                or_(
                    DeliveryAttempt.created_at < kept_at,
                    and_(DeliveryAttempt.created_at == kept_at, DeliveryAttempt.id < kept_id),
                ),
            )
            .order_by(DeliveryAttempt.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def prune_attempts() -> int:
    """Forget tests and checks older than ATTEMPT_RETENTION, but for each connector's latest KEEP_PROBES. Dispatch
    attempts are not touched here: they go with their message. At most PRUNE_BATCHES batches."""
    cutoff = db_now() - timedelta(seconds=current_app.config["ATTEMPT_RETENTION"])
    connectors = _connectors_with_old_probes(cutoff)
    removed = batches = 0
    doomed: list[uuid.UUID] = []

    def flush() -> None:
        nonlocal removed, batches, doomed
        if doomed:
            removed += db.session.execute(
                delete(DeliveryAttempt).where(DeliveryAttempt.id.in_(doomed)),
                execution_options={"synchronize_session": False},
            ).rowcount
            batches += 1
        db.session.commit()
        doomed = []

    for connector_id in connectors:
        while batches < PRUNE_BATCHES:
            room = PRUNE_BATCH - len(doomed)
            found = _prunable_probes(connector_id, cutoff, room)
            doomed += found
            if len(doomed) >= PRUNE_BATCH:
                flush()
            if len(found) < room:
                break
        if batches >= PRUNE_BATCHES:
            break
    flush()
    return removed


def sweep() -> dict[str, int]:
    """Close overdue attempts, advance the messages that are due, nudge the events' delivery, prune old events,
    messages and attempts."""
    closed = close_overdue()
    due = due_messages()
    for message_id, purpose in due:
        nudge(ADVANCE_MESSAGE, str(message_id), queue=advance_queue(purpose))
    if current_app.config["EVENTS_WEBHOOK_URL"] and has_due():
        nudge(DELIVER_EVENTS)
    return {
        "attempts_closed": closed,
        "messages_advanced": len(due),
        "events_pruned": prune_events(),
        "messages_pruned": prune_messages(),
        # Tests and checks; a message's attempts are counted in their message.
        "attempts_pruned": prune_attempts(),
    }
