"""Test deliveries: validate the destination, queue the job, wait for it, and keep the attempt log.

The web side (`run_test`) and the worker side (`claim_attempt`, `finish_attempt`) meet only through the
attempt row and the Celery result; no secret crosses the broker or the result backend.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult
from flask import current_app
from marshmallow import ValidationError
from sqlalchemy import Executable, bindparam, exists, insert, select, update

from app.connectors.models import Connector
from app.connectors.schemas import e164, email_address
from app.connectors.service import find_connector_type, get_connector, open_config
from app.deliveries.models import FAILED, PENDING, SENDING, SENT, TIMEOUT, DeliveryAttempt
from app.errors import InvalidError
from app.extensions import autocommit, db
from app.logs import request_id_var
from app.timeutil import utcnow
from worker.providers.base import BROKER_UNAVAILABLE, PROVIDER_CAUSED, WORKER_ERROR
from worker.providers.base import TIMEOUT as TIMEOUT_CODE

log = logging.getLogger(__name__)

TASK_NAME = "deliveries.send_test"
TELEGRAM_CHAT = re.compile(r"-?[0-9]{1,20}|@[A-Za-z][A-Za-z0-9_]{3,31}")
SUCCESS_MESSAGE = "Test message sent successfully"
RESULT_POLL_SECONDS = 0.01
PUBSUB_OVERSHOOT_SECONDS = 1.5
# The worker stops at the deadline; the web waits a little longer so that an answer given right at the
# deadline is reported rather than lost.
RESULT_GRACE_SECONDS = 0.25


@dataclass(frozen=True)
class Outcome:
    """What a test delivery came to; also the Celery result value, so it holds no secret."""

    success: bool
    message: str
    delivery_time_ms: int | None = None
    error_code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def normalize_destination(connector_type: str, raw: str) -> str:
    try:
        if connector_type == "email":
            return email_address(raw)
        if connector_type in {"sms", "whatsapp"}:
            return e164(raw)
    except ValidationError as exc:
        raise InvalidError("Invalid destination", errors={"json": {"test_destination": exc.messages}}) from None
    value = raw.strip()
    if not TELEGRAM_CHAT.fullmatch(value):
        raise InvalidError(
            "Invalid destination",
            errors={"json": {"test_destination": ["Must be a numeric chat id or an @channelname."]}},
        )
    return value


def mask(connector_type: str, destination: str) -> str:
    """Enough to recognise a destination in the log, not enough to harvest it."""
    if connector_type == "email":
        local, _, domain = destination.rpartition("@")
        return f"{local[:1]}***@{domain}"
    if connector_type in {"sms", "whatsapp"}:
        return destination[:3] + "*" * max(len(destination) - 5, 0) + destination[-2:]
    if destination.startswith("@"):
        return destination[:3] + "***"
    return "*" * max(len(destination) - 3, 0) + destination[-3:]


def _log(statement: Executable, params: dict[str, Any] | None = None) -> None:
    """Write to the attempt log in one autocommit statement.

    A statement on its own needs no BEGIN and COMMIT; those two round trips (and a SET LOCAL to skip the
    commit's fsync) cost more here than the fsync itself (~0.15 ms on PostgreSQL).
    """
    with autocommit() as conn:
        conn.execute(statement, params)


def _celery() -> Celery:
    return current_app.extensions["celery"]


def run_test(host_id: uuid.UUID, connector_id: uuid.UUID, raw_destination: str) -> Outcome:
    """Queue one test send on the connector's queue and wait for its outcome."""
    connector_type = find_connector_type(host_id, connector_id)
    destination = normalize_destination(connector_type, raw_destination)
    masked = mask(connector_type, destination)
    attempt_id = uuid.uuid4()
    _log(insert(DeliveryAttempt).values(id=attempt_id, connector_id=connector_id, destination=masked, status=PENDING))

    timeout = current_app.config["TEST_DELIVERY_TIMEOUT"]
    # The worker must be done by this (wall-clock) deadline, so nothing is sent after the caller's 502:
    # the expiry voids a job no worker took in time, and the worker cuts a send short at the deadline.
    deadline = time.time() + timeout
    try:
        result = _celery().send_task(
            TASK_NAME,
            args=[str(attempt_id), destination],
            kwargs={"request_id": request_id_var.get(), "deadline": deadline},
            argsrepr=repr([str(attempt_id), masked]),  # worker logs show the masked destination
            queue=connector_type,
            expires=timeout,
        )
    except Exception as exc:  # kombu raises several types when the broker is down
        log.warning("could not queue test delivery %s: %s", attempt_id, type(exc).__name__)
        outcome = Outcome(False, "the delivery queue is unavailable; try again shortly", error_code=BROKER_UNAVAILABLE)
        _close_unstarted(attempt_id, FAILED, outcome)
        return outcome

    try:
        value = _wait(result, timeout + RESULT_GRACE_SECONDS)
    except Exception as exc:  # the result backend itself failed
        log.warning("result backend failed for %s: %s", attempt_id, type(exc).__name__)
        outcome = Outcome(False, "the result store is unavailable; try again shortly", error_code=BROKER_UNAVAILABLE)
        _close_unstarted(attempt_id, FAILED, outcome)
        return outcome
    finally:
        _forget(result)

    if isinstance(value, dict) and "success" in value:
        return Outcome(**value)
    if value is None:
        outcome = Outcome(False, f"no worker answered within {timeout:g} s", error_code=TIMEOUT_CODE)
        _close_unstarted(attempt_id, TIMEOUT, outcome)
        return outcome
    log.error("test delivery %s ended with an unexpected result type %s", attempt_id, type(value).__name__)
    outcome = Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)
    _close_unstarted(attempt_id, FAILED, outcome)
    return outcome


def _forget(result: AsyncResult) -> None:
    try:
        result.forget()
    except Exception as exc:  # the store went away; the result expires there by itself
        log.warning("could not remove result %s: %s", result.id, type(exc).__name__)


def _wait(result: AsyncResult, timeout: float) -> Any:
    """The task's return value, or None once `timeout` seconds of wall-clock time have passed."""
    deadline = time.monotonic() + timeout
    if result.backend.is_async and timeout > PUBSUB_OVERSHOOT_SECONDS:
        # Redis pub/sub wakes on the result itself, but looks at its timeout only between one-second
        # waits and can overshoot it by that much: let it stop early enough, then poll to the deadline.
        try:
            return result.get(timeout=timeout - PUBSUB_OVERSHOOT_SECONDS, propagate=False)
        except CeleryTimeout:
            pass
    # Polling backends (the embedded SQLite one) count their timeout in sleep intervals, not in elapsed
    # time, so a slow poll stretches it; keep our own deadline.
    while not result.ready():
        if time.monotonic() >= deadline:
            return None
        time.sleep(RESULT_POLL_SECONDS)
    return result.get(propagate=False)


def _close_unstarted(attempt_id: uuid.UUID, status: str, outcome: Outcome) -> None:
    """Close an attempt the caller stopped waiting for.

    A pending one can no longer be claimed. A claimed one whose worker died would otherwise stay
    `sending` forever; if its worker is alive and finishes after all, it records the real outcome.
    """
    _log(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == attempt_id, DeliveryAttempt.status.in_([PENDING, SENDING]))
        .values(status=status, error_code=outcome.error_code, message=outcome.message, finished_at=utcnow())
    )


@dataclass(frozen=True)
class Job:
    connector_id: uuid.UUID
    connector_type: str
    config: dict[str, Any]
    sealed: bytes  # the config as sealed when claimed: a verdict counts only for that config


# Worker statements, built once and run through Core: the ORM's identity map and unit of work cost more CPU
# than these few rows need, and the worker runs one per delivery.
CLAIM = (
    update(DeliveryAttempt)
    .where(DeliveryAttempt.id == bindparam("attempt_id"), DeliveryAttempt.status == PENDING)
    .values(status=SENDING)
)
JOB_COLUMNS = (Connector.id, Connector.host_id, Connector.type, Connector.config_key_id, Connector.config_sealed)
# PostgreSQL: the claim and the read of its connector in one statement (UPDATE ... FROM ... RETURNING).
# SQLite cannot return the joined table's columns, so it claims, then reads.
CLAIM_JOB = CLAIM.where(Connector.id == DeliveryAttempt.connector_id).returning(*JOB_COLUMNS)
CLAIMED_CONNECTOR = select(DeliveryAttempt.connector_id).where(DeliveryAttempt.id == bindparam("attempt_id"))
JOB_CONNECTOR = select(*JOB_COLUMNS).where(Connector.id == bindparam("connector_id"))


def claim_attempt(attempt_id: uuid.UUID) -> Job | None:
    """Take a pending attempt for sending, once: a redelivered or expired job finds nothing to claim.

    The claim is one durable statement of its own (autocommit), and no connection is held once it returns,
    so none is held during the provider call.
    """
    params = {"attempt_id": attempt_id}
    with autocommit() as conn:
        if conn.dialect.name == "postgresql":
            connector = conn.execute(CLAIM_JOB, params).one_or_none()
        else:
            if conn.dialect.update_returning:
                connector_id = conn.execute(CLAIM.returning(DeliveryAttempt.connector_id), params).scalar()
            else:  # SQLite before 3.35: the same claim, then a read of what it claimed
                claimed = conn.execute(CLAIM, params).rowcount == 1
                connector_id = conn.execute(CLAIMED_CONNECTOR, params).scalar() if claimed else None
            if connector_id is None:
                return None
            connector = conn.execute(JOB_CONNECTOR, {"connector_id": connector_id}).one_or_none()
    if connector is None:
        return None
    return Job(connector.id, connector.type, open_config(connector), connector.config_sealed)


# The outcome and the connector's verdict. Parameter names differ from column names: SQLAlchemy would read
# a parameter named like a column as one more column to SET.
RECORD = (
    update(DeliveryAttempt)
    .where(DeliveryAttempt.id == bindparam("attempt_id"))
    .values(
        status=bindparam("new_status"),
        error_code=bindparam("new_error_code"),
        message=bindparam("new_message"),
        delivery_time_ms=bindparam("new_delivery_time_ms"),
        finished_at=bindparam("now"),
    )
)
# updated_at is set here: a column's onupdate is not applied to an UPDATE that carries a CTE. The verdict
# counts only for the config that was tested: a config replaced meanwhile has not been tested.
VERDICT = (
    update(Connector)
    .where(Connector.id == bindparam("job_connector_id"), Connector.config_sealed == bindparam("job_sealed"))
    .values(is_verified=bindparam("verified"), updated_at=bindparam("now"))
)
# PostgreSQL: both writes in one statement (a data-modifying CTE), atomic, one round trip instead of four.
_RECORDED = RECORD.returning(DeliveryAttempt.id).cte("recorded")
RECORD_WITH_VERDICT = VERDICT.where(exists(select(_RECORDED.c.id)))


def finish_attempt(attempt_id: uuid.UUID, job: Job | None, outcome: Outcome) -> None:
    """Record the outcome; the provider's verdict decides is_verified, our own failures leave it be."""
    params: dict[str, Any] = {
        "attempt_id": attempt_id,
        "new_status": SENT if outcome.success else FAILED,
        "new_error_code": outcome.error_code,
        "new_message": outcome.message,
        "new_delivery_time_ms": outcome.delivery_time_ms,
        "now": utcnow(),
    }
    if job is None or not (outcome.success or outcome.error_code in PROVIDER_CAUSED):
        _log(RECORD, params)
        return
    params.update(job_connector_id=job.connector_id, job_sealed=job.sealed, verified=outcome.success)
    if db.engine.dialect.name == "postgresql":
        _log(RECORD_WITH_VERDICT, params)
        return
    with db.engine.begin() as conn:
        conn.execute(RECORD, params)
        conn.execute(VERDICT, params)


def list_attempts(host_id: uuid.UUID, connector_id: uuid.UUID, limit: int) -> list[DeliveryAttempt]:
    get_connector(host_id, connector_id)
    query = (
        select(DeliveryAttempt)
        .where(DeliveryAttempt.connector_id == connector_id)
        .order_by(DeliveryAttempt.created_at.desc(), DeliveryAttempt.id.desc())
        .limit(limit)
    )
    return list(db.session.scalars(query))


def elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
