"""The daily re-check, beat's side: which connectors are due, and their check jobs queued."""

from __future__ import annotations

import uuid
from datetime import timedelta

from flask import current_app
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from app.attempts import CHECK, PENDING, SENDING, TEST, DeliveryAttempt
from app.channels import channel
from app.connectors.models import Connector
from app.connectors.service import first_check_at
from app.errors import with_database_retry
from app.extensions import db
from app.queues import CHECK_CONNECTOR
from app.timeutil import db_now


def schedule_checks() -> list[tuple[uuid.UUID, str]]:
    """The re-checks due now, as (attempt id, connector type) to queue: at most
    CONNECTOR_CHECK_CONCURRENCY in flight, the oldest due first; connectors never scheduled get a random
    moment within the interval."""
    config = current_app.config
    now = db_now()
    unscheduled = db.session.scalars(select(Connector).where(Connector.next_check_at.is_(None)).limit(1000)).all()
    for connector in unscheduled:
        connector.next_check_at = first_check_at(now)
    in_flight = db.session.scalar(
        select(func.count())
        .select_from(DeliveryAttempt)
        .where(DeliveryAttempt.kind == CHECK, DeliveryAttempt.status.in_([PENDING, SENDING]))
    )
    room = max(config["CONNECTOR_CHECK_CONCURRENCY"] - (in_flight or 0), 0)
    busy = select(DeliveryAttempt.connector_id).where(
        DeliveryAttempt.kind.in_([TEST, CHECK]),
        DeliveryAttempt.status.in_([PENDING, SENDING]),
        DeliveryAttempt.connector_id.is_not(None),  # NOT IN a set holding NULL matches nothing
    )
    due = db.session.scalars(
        select(Connector)
        .where(Connector.next_check_at <= now, Connector.id.not_in(busy))
        .order_by(Connector.next_check_at)
        .limit(room)
    ).all()
    timeout = 2 * config["PROVIDER_TIMEOUT"]
    # If the check fails for a reason of ours (no worker, no broker) nothing changes but this: a try again later.
    retry = timedelta(seconds=min(config["CONNECTOR_CHECK_INTERVAL"], 900))
    scheduled = []
    for connector in due:
        attempt = DeliveryAttempt(
            id=uuid.uuid4(),
            connector_id=connector.id,
            connector_type=connector.type,
            kind=CHECK,
            status=PENDING,
            created_at=now,
            deadline_at=now + timedelta(seconds=timeout),
        )
        db.session.add(attempt)
        connector.next_check_at = now + retry
        scheduled.append((attempt.id, connector.type))
    try:
        db.session.commit()
    except IntegrityError:  # a Host started a test of one of them meanwhile: the next tick takes the rest
        db.session.rollback()
        return []
    return scheduled


def queue_due_checks() -> int:
    """Schedule the re-checks that are due and queue their jobs; how many were queued."""
    scheduled = with_database_retry("schedule checks", schedule_checks, seconds=10)
    celery = current_app.extensions["celery"]
    for attempt_id, connector_type in scheduled:
        # A job that no worker takes before the deadline expires unstarted; the sweep closes its attempt.
        celery.send_task(
            CHECK_CONNECTOR,
            args=(str(attempt_id),),
            queue=channel(connector_type).queue,
            expires=2 * current_app.config["PROVIDER_TIMEOUT"],
        )
    return len(scheduled)
