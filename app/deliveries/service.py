"""Tests and checks, the web's side: validate the destination, write the attempt, queue its job, wait for it.

The attempt log in the database is the source of truth. The web writes the attempt, queues a job that carries
its id, and waits: on the Celery result as the fast path, on the attempt row as the sure one (a result the
store could not keep is still found there). The worker claims the attempt, calls the provider and records
the outcome (`app.deliveries.jobs`). No secret crosses the broker or the result backend.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from celery.states import REVOKED
from flask import current_app
from marshmallow import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.attempts import CHECK, FAILED, FINISHED, PENDING, TEST, VERIFIED, DeliveryAttempt
from app.channels import channel
from app.connectors.models import Connector
from app.connectors.service import get_connector, keyring
from app.deliveries.jobs import CHECK_SUCCESS, SUCCESS_MESSAGE, close_attempt
from app.errors import (
    DATABASE_DOWN,
    IN_PROGRESS,
    BusyError,
    ConflictError,
    InvalidError,
    NotFoundError,
    discard_session,
)
from app.extensions import db
from app.logs import request_id_var
from app.outcomes import BROKER_UNAVAILABLE, WORKER_ERROR, Outcome
from app.outcomes import TIMEOUT as TIMEOUT_CODE
from app.queues import CHECK_CONNECTOR, SEND_TEST
from app.timeutil import db_now

log = logging.getLogger(__name__)

# How often the waiting web request also looks at the attempt row, in case the result never arrives.
LOG_POLL_SECONDS = 1.0
RESULT_POLL_SECONDS = 0.01
RESULT_POLL_MAX_SECONDS = 0.2
PUBSUB_SLICE_SECONDS = 1.0
# The worker stops at the deadline; the web waits a little longer so that an answer given right at the
# deadline is reported rather than lost.
RESULT_GRACE_SECONDS = 0.25


_slots_lock = threading.Lock()


@contextmanager
def _wait_slot() -> Iterator[None]:
    """One of this process's TEST_WAITS_PER_PROCESS slots, or BusyError at once.

    A waiting test holds a web thread for up to TEST_DELIVERY_TIMEOUT; without a bound, tests against slow
    servers (which Hosts choose) would take every thread and starve every other request.
    """
    with _slots_lock:
        slots = current_app.extensions.get("test_wait_slots")
        if slots is None:
            slots = current_app.extensions["test_wait_slots"] = threading.BoundedSemaphore(
                current_app.config["TEST_WAITS_PER_PROCESS"]
            )
    if not slots.acquire(blocking=False):
        raise BusyError("Too many tests are in progress; try again in a few seconds")
    try:
        yield
    finally:
        slots.release()


def _celery() -> Celery:
    return current_app.extensions["celery"]


def normalize_destination(connector_type: str, raw: str) -> str:
    try:
        return channel(connector_type).normalize(raw)
    except ValidationError as exc:
        raise InvalidError("Invalid destination", errors={"json": {"test_destination": exc.messages}}) from None


def run_test(host_id: uuid.UUID, connector_id: uuid.UUID, raw_destination: str) -> Outcome:
    """Queue one test send on the connector's queue and wait for its outcome."""
    connector = get_connector(host_id, connector_id)
    kind = channel(connector.type)
    destination = normalize_destination(connector.type, raw_destination)
    return _run(host_id, connector_id, kind.name, TEST, SEND_TEST, destination)


def run_check(host_id: uuid.UUID, connector_id: uuid.UUID) -> Outcome:
    """Queue one credential check (nothing is delivered to anyone) and wait for its outcome."""
    connector = get_connector(host_id, connector_id)
    return _run(host_id, connector_id, connector.type, CHECK, CHECK_CONNECTOR, None)


def _run(
    host_id: uuid.UUID, connector_id: uuid.UUID, type_name: str, kind: str, task: str, destination: str | None
) -> Outcome:
    db.session.rollback()  # nothing is held while the job runs
    timeout = current_app.config["TEST_DELIVERY_TIMEOUT"]
    masked = channel(type_name).mask(destination) if destination else None
    with _wait_slot():
        attempt_id = _open_attempt(host_id, connector_id, type_name, kind, destination, timeout)
        # The worker must be done by the attempt's deadline (on the database's clock), so nothing runs after the
        # caller's 502: the expiry voids a job no worker took in time, and the worker cuts a provider call short.
        try:
            # Only the attempt's id goes through the broker: the destination is sealed in its row.
            result = _celery().send_task(
                task,
                args=(str(attempt_id),),
                kwargs={"request_id": request_id_var.get()},
                queue=channel(type_name).queue,
                expires=timeout,
                argsrepr=repr([str(attempt_id), masked]),  # logs show the mask
            )
        except Exception as exc:  # kombu raises several types when the broker is down
            log.warning("could not queue %s %s: %s", kind, attempt_id, type(exc).__name__)
            outcome = Outcome(
                False, "the delivery queue is unavailable; try again shortly", error_code=BROKER_UNAVAILABLE
            )
            close_open(attempt_id, outcome)
            return outcome
        return _await(attempt_id, result, timeout)


def _open_attempt(
    host_id: uuid.UUID,
    connector_id: uuid.UUID,
    connector_type: str,
    kind: str,
    destination: str | None,
    timeout: float,
) -> uuid.UUID:
    attempt = DeliveryAttempt(
        id=uuid.uuid4(),
        connector_id=connector_id,
        connector_type=connector_type,
        kind=kind,
        destination=channel(connector_type).mask(destination) if destination else None,
        status=PENDING,
        deadline_at=db_now() + timedelta(seconds=timeout),
    )
    if destination:
        sealed = keyring().seal(host_id, attempt.id, {"destination": destination})
        attempt.destination_key_id, attempt.destination_sealed = sealed.key_id, sealed.ciphertext
    db.session.add(attempt)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        if db.session.get(Connector, connector_id) is None:  # deleted meanwhile
            raise NotFoundError("Connector not found") from None
        raise ConflictError(
            "A test or check of this connector is already in progress; wait for its answer", error_code=IN_PROGRESS
        ) from None
    return attempt.id


def _await(attempt_id: uuid.UUID, result: AsyncResult, timeout: float) -> Outcome:
    """The outcome from the result or from the attempt log, whichever comes first; `timeout` otherwise."""
    deadline = time.monotonic() + timeout + RESULT_GRACE_SECONDS
    try:
        while True:
            remaining = deadline - time.monotonic()
            value = _poll_result(result, LOG_POLL_SECONDS if remaining > 2 * LOG_POLL_SECONDS else max(remaining, 0))
            if isinstance(value, dict) and "success" in value:
                return Outcome(**value)
            logged = _logged_outcome(attempt_id)
            if logged is not None:
                return logged
            if value is REVOKED or result.state == REVOKED:  # the job expired before a worker took it
                break
            if isinstance(value, BaseException):  # the task itself raised: a bug, not the provider
                log.error("test %s failed in the worker: %s", attempt_id, type(value).__name__)
                outcome = Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)
                close_open(attempt_id, outcome)
                return outcome
            if time.monotonic() >= deadline:
                break
    finally:
        _forget(result)
    outcome = Outcome(False, f"no worker finished the test within {timeout:g} s", error_code=TIMEOUT_CODE)
    close_open(attempt_id, outcome)
    return _logged_outcome(attempt_id) or outcome


def _poll_result(result: AsyncResult, seconds: float) -> Any:
    """The task's return value, REVOKED, or None if neither came within about `seconds` (or the store failed)."""
    try:
        if result.backend.is_async and seconds >= PUBSUB_SLICE_SECONDS:
            # Redis pub/sub wakes on the result itself, but looks at its timeout only between one-second
            # waits: ask it for whole slices only, and poll what is left of the deadline.
            return result.get(timeout=PUBSUB_SLICE_SECONDS, propagate=False)
        # Polling backends (the embedded SQLite one) count their timeout in sleep intervals, not in elapsed
        # time, so a slow poll stretches it; keep our own clock.
        until, pause = time.monotonic() + seconds, RESULT_POLL_SECONDS
        while not result.ready():
            if time.monotonic() >= until:
                return None
            time.sleep(pause)
            pause = min(pause * 2, RESULT_POLL_MAX_SECONDS)  # a quick answer found quickly, a slow one cheaply
        if result.state == REVOKED:
            return REVOKED
        return result.get(propagate=False)
    except CeleryTimeout:
        return None
    except Exception as exc:  # the result store failed: the attempt log still answers
        log.warning("result store failed for %s: %s", result.id, type(exc).__name__)
        time.sleep(min(seconds, LOG_POLL_SECONDS))
        return None


def _forget(result: AsyncResult) -> None:
    try:
        result.forget()
    except Exception as exc:  # the store went away; the result expires there by itself
        log.warning("could not remove result %s: %s", result.id, type(exc).__name__)


def _logged_outcome(attempt_id: uuid.UUID) -> Outcome | None:
    """The outcome the worker recorded, if it has; None while the database cannot say.

    The fields are read before the transaction ends: a read after it would open another and hold a pooled
    connection idle in it for as long as the request waits."""
    try:
        row = db.session.execute(
            select(
                DeliveryAttempt.status,
                DeliveryAttempt.message,
                DeliveryAttempt.error_code,
                DeliveryAttempt.delivery_time_ms,
            ).where(DeliveryAttempt.id == attempt_id)
        ).first()
        db.session.rollback()
    except DATABASE_DOWN as exc:  # the result may still come through the broker: keep waiting for it
        log.warning("attempt log unavailable while waiting for %s: %s", attempt_id, type(exc).__name__)
        discard_session()
        return None
    if row is None or row.status not in FINISHED:
        return None
    if row.status != FAILED:
        done = CHECK_SUCCESS if row.status == VERIFIED else SUCCESS_MESSAGE
        return Outcome(True, row.message or done, delivery_time_ms=row.delivery_time_ms)
    return Outcome(False, row.message or "the delivery failed", error_code=row.error_code or WORKER_ERROR)


def close_open(attempt_id: uuid.UUID, outcome: Outcome) -> None:
    """Close an attempt the caller stopped waiting for (see `close_attempt`)."""
    try:
        close_attempt(attempt_id, outcome)
    except DATABASE_DOWN as exc:  # the sweep closes it once the database is back
        log.warning("could not close attempt %s: %s", attempt_id, type(exc).__name__)
        discard_session()


def list_attempts(host_id: uuid.UUID, connector_id: uuid.UUID, limit: int) -> list[DeliveryAttempt]:
    get_connector(host_id, connector_id)
    query = (
        select(DeliveryAttempt)
        .where(DeliveryAttempt.connector_id == connector_id)
        .order_by(DeliveryAttempt.created_at.desc(), DeliveryAttempt.id.desc())
        .limit(limit)
    )
    return list(db.session.scalars(query))
