"""Celery tasks, one per job name of `app.queues`. Thin: they take ids, call one operation of the domain, and log
one line of what it came to."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore

from app.deliveries.checks import queue_due_checks
from app.deliveries.jobs import Ran, run_probe
from app.events.service import deliver_due
from app.logs import request_id_var
from app.messages import dispatch
from app.queues import (
    ADVANCE_MESSAGE,
    CHECK_CONNECTOR,
    CHECK_SCHEDULE,
    DELIVER_EVENTS,
    SEND_MESSAGE,
    SEND_TEST,
    SWEEP,
)
from app.sweep import sweep as sweep_once

log = logging.getLogger(__name__)


@shared_task(name=SEND_TEST, bind=True)
def send_test(
    task: Task,
    attempt_id: str,
    destination: str | None = None,
    request_id: str | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """A test message to the destination sealed in the attempt, for a Host waiting on the answer until the
    attempt's deadline. Jobs queued by an older web process carry `destination` (used when the attempt holds none)
    and a wall-clock `deadline` (no longer read: the deadline is the attempt's, on the database's clock)."""
    return _probe(task, "test delivery", attempt_id, destination, request_id)


@shared_task(name=CHECK_CONNECTOR, bind=True)
def check_connector(
    task: Task, attempt_id: str, request_id: str | None = None, deadline: float | None = None
) -> dict[str, Any]:
    """Prove the credentials and the sender without delivering anything (a Host's check, or the re-check)."""
    return _probe(task, "check", attempt_id, None, request_id)


def _probe(task: Task, what: str, attempt_id: str, destination: str | None, request_id: str | None) -> dict[str, Any]:
    request_id_var.set(request_id)  # the web request's id, in every line this task logs
    started = time.perf_counter()
    ran = run_probe(uuid.UUID(attempt_id), destination)
    _log(task, f"{what} {attempt_id}: {ran.label}", ran, started, attempt_id=attempt_id)
    if ran.outcome is None:
        raise Ignore()  # a copy of a job already taken: its claimant answers the caller
    return ran.outcome.as_dict()


@shared_task(name=ADVANCE_MESSAGE, ignore_result=True)
def advance_message(message_id: str) -> None:
    """Decide a message's next step and queue its send on the connector type's queue."""
    dispatch.advance_and_queue(uuid.UUID(message_id))


@shared_task(name=SEND_MESSAGE, ignore_result=True, bind=True)
def send_message(task: Task, message_id: str, connector_id: str, round_: int) -> None:
    """One provider call for one message through one connector, claimed in the database first."""
    started = time.perf_counter()
    ran = dispatch.send(uuid.UUID(message_id), uuid.UUID(connector_id), round_)
    if ran.job is not None:
        _log(task, f"message {message_id} through {ran.job.connector_type}: {ran.label}", ran, started,
             message_id=message_id)  # fmt: skip


@shared_task(name=SWEEP)
def sweep() -> dict[str, int]:
    """Celery beat, every SWEEP_INTERVAL: close and advance what no job will (lost jobs, dead workers, rounds
    due, expiry)."""
    return sweep_once()


@shared_task(name=CHECK_SCHEDULE)
def schedule_checks() -> int:
    """Celery beat: queue the re-checks that are due (each connector once per CONNECTOR_CHECK_INTERVAL)."""
    return queue_due_checks()


@shared_task(name=DELIVER_EVENTS, ignore_result=True)
def deliver_events() -> int:
    """Send the outbox to EVENTS_WEBHOOK_URL, oldest first; stops at the first failure (order is kept)."""
    return deliver_due()


def _log(task: Task, text: str, ran: Ran, started: float, **fields: str) -> None:
    outcome = ran.outcome
    log.info(
        "%s",
        text,
        extra={
            "fields": {
                "task_id": task.request.id,
                **fields,
                "connector_id": str(ran.job.connector_id) if ran.job else None,
                "queue": (task.request.delivery_info or {}).get("routing_key"),
                "outcome": ran.label,
                "error_code": outcome.error_code if outcome else None,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        },
    )
