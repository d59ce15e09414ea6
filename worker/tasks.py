"""Celery tasks. Thin: they take ids, load what they need, call one provider, record the outcome."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import Task, shared_task
from flask import current_app

from app.deliveries import service as deliveries
from app.deliveries.service import SUCCESS_MESSAGE, Outcome
from app.logs import request_id_var
from worker.providers import build_provider
from worker.providers.base import TIMEOUT, WORKER_ERROR, DeliveryError, OutgoingMessage, ProviderSettings, scrub

log = logging.getLogger(__name__)

TEST_MESSAGE = OutgoingMessage(
    subject="BAPBA connector test",
    text="This is a test message from your BAPBA connector. If you can read it, the channel works.",
    html="<p>This is a test message from your <b>BAPBA</b> connector. If you can read it, the channel works.</p>",
)


MESSAGE_LIMIT = 500
# Below this much time left before the caller's deadline, a job is not started at all.
MIN_SEND_SECONDS = 0.2


def provider_settings(budget: float) -> ProviderSettings:
    config = current_app.config
    return ProviderSettings(
        timeout=budget,
        allow_private=config["ALLOW_PRIVATE_DESTINATIONS"],
        twilio_base_url=config["TWILIO_API_BASE_URL"],
        whatsapp_base_url=config["WHATSAPP_API_BASE_URL"],
        telegram_base_url=config["TELEGRAM_API_BASE_URL"],
    )


@shared_task(name=deliveries.TASK_NAME, bind=True)
def send_test(
    task: Task, attempt_id: str, destination: str, request_id: str | None = None, deadline: float | None = None
) -> dict[str, Any]:
    request_id_var.set(request_id)  # the web request's id, in every line this task logs
    started_task = time.perf_counter()
    attempt_uuid = uuid.UUID(attempt_id)
    budget = current_app.config["PROVIDER_TIMEOUT"]
    if deadline is not None:
        budget = min(budget, deadline - time.time())
    if budget < MIN_SEND_SECONDS:  # the caller has given up (or is about to): sending now would surprise them
        _log_task(task, attempt_id, None, "too_late", started_task)
        return Outcome(False, "the test reached a worker too late; it was not sent", error_code=TIMEOUT).as_dict()

    try:
        job = deliveries.claim_attempt(attempt_uuid)
    except Exception as exc:  # e.g. a config sealed under a key this worker does not have
        log.error("test delivery %s could not be prepared: %s", attempt_id, type(exc).__name__)
        outcome = Outcome(False, "the worker could not prepare the test", error_code=WORKER_ERROR)
        deliveries.finish_attempt(attempt_uuid, None, outcome)
        _log_task(task, attempt_id, None, "worker_error", started_task)
        return outcome.as_dict()
    if job is None:
        message = "this test was already started or closed; it is not sent twice"
        outcome = Outcome(False, message, error_code=WORKER_ERROR)
        _log_task(task, attempt_id, None, "skipped", started_task)
        return outcome.as_dict()

    provider = build_provider(job.connector_type, provider_settings(budget))
    started = time.perf_counter()
    try:
        provider.send(job.config, destination, TEST_MESSAGE)
    except DeliveryError as exc:
        # Scrub before cutting: a cut could leave a partial secret that the scrub no longer recognises.
        message = scrub(exc.message, provider.secrets(job.config))[:MESSAGE_LIMIT]
        outcome = Outcome(False, message, error_code=exc.code)
    except Exception as exc:  # a bug or a library surprise: report it without its text, which may hold secrets
        log.error("test delivery %s failed unexpectedly: %s", attempt_id, type(exc).__name__)
        outcome = Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)
    else:
        outcome = Outcome(True, SUCCESS_MESSAGE, delivery_time_ms=deliveries.elapsed_ms(started))
    deliveries.finish_attempt(attempt_uuid, job, outcome)
    _log_task(task, attempt_id, job.connector_id, "sent" if outcome.success else str(outcome.error_code), started_task)
    return outcome.as_dict()


def _log_task(task: Task, attempt_id: str, connector_id: uuid.UUID | None, outcome: str, started: float) -> None:
    queue = (task.request.delivery_info or {}).get("routing_key")
    log.info(
        "test delivery %s: %s",
        attempt_id,
        outcome,
        extra={
            "fields": {
                "task_id": task.request.id,
                "attempt_id": attempt_id,
                "connector_id": str(connector_id) if connector_id else None,
                "queue": queue,
                "outcome": outcome,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        },
    )
