"""The events outbox: written in the transaction of the change it reports, sent by the worker, polled by anyone.

Receivers get each event at least once, in order, signed as the Standard Webhooks specification says; a retry
carries the same `webhook-id`. Delivery retries with backoff (seconds at first, then growing) for a day.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import current_app
from sqlalchemy import or_, select, text, update

from app.errors import with_database_retry
from app.events.models import Event
from app.events.webhook import post_event
from app.extensions import db
from app.fields import TIMESTAMP_FORMAT
from app.queues import DELIVER_EVENTS, nudge, nudge_coalesced
from app.timeutil import db_now

log = logging.getLogger(__name__)

GIVE_UP_AFTER = timedelta(days=1)
MAX_BACKOFF_SECONDS = 3600.0
# Events a delivery job posts at most; the next nudge or sweep takes the rest.
DELIVERY_BATCH = 500

EVENTS_LOCK = 0x62617062  # any constant of our own: the key of the events' advisory lock


def emit(type_: str, host_id: uuid.UUID, data: dict[str, Any]) -> None:
    """Add an event to the caller's transaction: it is committed with the change, or not at all.

    The caller's pending changes are written first, so that the events' lock is the last lock of every
    transaction: with one order everywhere, no two writers can deadlock through it. An error of that write
    (a duplicate name) is raised here; callers handle it as they would at their commit."""
    db.session.flush()
    # Why one lock for every writer of events: an event's id is given at its insert but becomes visible at its
    # commit, so two transactions committing in the other order would show id 8 before id 7, and a poller that
    # passed `after=8` would never see 7. Holding this lock from the insert to the commit makes writers take
    # turns, so ids become visible in order. (SQLite has one writer anyway.)
    if db.session.get_bind().dialect.name == "postgresql":
        db.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": EVENTS_LOCK})
    data = json.loads(json.dumps(data, default=str))
    db.session.add(Event(type=type_, host_id=host_id, data=data, created_at=db_now()))
    db.session.info["events_written"] = True


def announce() -> None:
    """After a commit that emitted events: have the worker send them now rather than at the next sweep (one
    delivery job for a burst of commits: each job sends all that is due)."""
    if db.session.info.pop("events_written", False) and current_app.config["EVENTS_WEBHOOK_URL"]:
        nudge_coalesced(DELIVER_EVENTS)


def connector_event(type_: str, connector: Any, error_code: str | None = None, message: str | None = None) -> None:
    emit(
        type_,
        connector.host_id,
        {
            "host_id": connector.host_id,
            "connector_id": connector.id,
            "connector_type": connector.type,
            "error_code": error_code,
            "message": message,
        },
    )


def as_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "timestamp": event.created_at.strftime(TIMESTAMP_FORMAT),
        "data": event.data,
    }


def list_events(after: int, limit: int) -> list[Event]:
    query = select(Event).where(Event.id > after).order_by(Event.id).limit(limit)
    return list(db.session.scalars(query))


@dataclass(frozen=True)
class Claimed:
    id: int
    payload: str
    created_at: datetime
    tries: int
    claimed_at: datetime  # on the database's clock: the post's `webhook-timestamp`


def claim_next(lease_seconds: float, delivered: Claimed | None = None) -> Claimed | None:
    """The oldest undelivered event if it is due, taken for one try; None when there is none (or it waits).

    Nothing later is sent while it waits: receivers see events in order. The claim is a compare-and-set in one
    statement (the head, if still undelivered and due, gets its try and a lease), so two workers never send one
    event at once, and a worker that dies mid-try only delays it. `delivered`, the event this worker has just
    posted, is recorded in the same transaction: one commit per event.
    """
    now = db_now()
    if delivered is not None:
        _record(delivered, None, now)
    claimed = _take_head(now, lease_seconds)
    # The head is too old to post (e.g. written while no webhook was set: polled, not posted): every such event
    # is set aside at once, however many, and the head taken again.
    if claimed is None and _set_aside_stale(now):
        claimed = _take_head(now, lease_seconds)
    db.session.commit()
    return claimed


def _take_head(now: datetime, lease_seconds: float) -> Claimed | None:
    head = (
        select(Event.id)
        .where(Event.delivered_at.is_(None), Event.abandoned_at.is_(None))
        .order_by(Event.id)
        .limit(1)
        .correlate(None)
        .scalar_subquery()
    )
    # The conditions are checked again on the row it locks: a second worker whose statement met the head before
    # the first committed finds it leased (or delivered) and takes nothing.
    row = db.session.execute(
        update(Event)
        .where(
            Event.id == head,
            Event.delivered_at.is_(None),
            Event.abandoned_at.is_(None),
            Event.created_at > now - GIVE_UP_AFTER,
            or_(Event.next_try_at.is_(None), Event.next_try_at <= now),
        )
        .values(tries=Event.tries + 1, next_try_at=now + timedelta(seconds=lease_seconds))
        .returning(Event.id, Event.type, Event.created_at, Event.data, Event.tries)
        .execution_options(synchronize_session=False)  # no Event is loaded in this session: none to refresh
    ).first()
    if row is None:
        return None
    body = {"type": row.type, "timestamp": row.created_at.strftime(TIMESTAMP_FORMAT), "data": row.data}
    return Claimed(row.id, json.dumps(body, separators=(",", ":")), row.created_at, row.tries, now)


def _set_aside_stale(now: datetime) -> bool:
    stale = (Event.delivered_at.is_(None), Event.abandoned_at.is_(None), Event.created_at <= now - GIVE_UP_AFTER)
    return bool(db.session.execute(update(Event).where(*stale).values(abandoned_at=now, next_try_at=None)).rowcount)


def record_try(event: Claimed, error: str | None) -> None:
    """Delivered (error None), or retried after a backoff, or given up a day after the event."""
    _record(event, error, db_now())
    db.session.commit()


def _record(event: Claimed, error: str | None, now: datetime) -> None:
    values: dict[str, Any]
    if error is None:
        values = {"delivered_at": now, "next_try_at": None, "last_error": None}
    elif now - event.created_at >= GIVE_UP_AFTER:
        values = {"abandoned_at": now, "next_try_at": None, "last_error": error}
        log.error("event %s abandoned after %s tries: %s", event.id, event.tries, error)
    else:
        delay = min(MAX_BACKOFF_SECONDS, current_app.config["EVENTS_RETRY_BASE"] * 2 ** (event.tries - 1))
        values = {"next_try_at": now + timedelta(seconds=delay), "last_error": error}
        log.warning("event %s not delivered (%s); try %s again in %.1f s", event.id, error, event.tries + 1, delay)
    db.session.execute(
        update(Event).where(Event.id == event.id).values(**values).execution_options(synchronize_session=False)
    )


def has_due() -> bool:
    head = db.session.execute(
        select(Event.id, Event.next_try_at)
        .where(Event.delivered_at.is_(None), Event.abandoned_at.is_(None))
        .order_by(Event.id)
        .limit(1)
    ).first()
    now = db_now()
    db.session.rollback()
    return head is not None and (head.next_try_at is None or head.next_try_at <= now)


def deliver_due() -> int:
    """Post the outbox to EVENTS_WEBHOOK_URL, oldest first, up to a batch; stops at the first failure (order is
    kept). How many were delivered. A full batch queues the next delivery job, so that a backlog drains job after
    job (each bounded) rather than one batch per sweep."""
    config = current_app.config
    if not config["EVENTS_WEBHOOK_URL"]:
        return 0
    timeout = config["EVENTS_TIMEOUT"]
    lease = timeout * 2 + 5  # a post ends within `timeout`: the lease outlives it with room for the recording
    sent = 0
    claimed = with_database_retry("claim event", lambda: claim_next(lease), seconds=60)
    while claimed is not None:
        error = post_event(
            config["EVENTS_WEBHOOK_URL"],
            config["EVENTS_WEBHOOK_SECRET"],
            claimed.id,
            claimed.payload,
            timeout,
            claimed.claimed_at,
        )
        if error is not None:
            with_database_retry("record event", lambda c=claimed, e=error: record_try(c, e), seconds=60)
            break
        sent += 1
        if sent == DELIVERY_BATCH:
            with_database_retry("record event", lambda c=claimed: record_try(c, None), seconds=60)
            nudge(DELIVER_EVENTS)
            break
        claimed = with_database_retry("record event", lambda c=claimed: claim_next(lease, delivered=c), seconds=60)
    return sent
