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
from worker.providers.base import WORKER_ERROR, DeliveryError, OutgoingMessage, ProviderSettings, scrub

log = logging.getLogger(__name__)

TEST_MESSAGE = OutgoingMessage(
    subject="BAPBA connector test",
    text="This is a test message from your BAPBA connector. If you can read it, the channel works.",
    html="<p>This is a test message from your <b>BAPBA</b> connector. If you can read it, the channel works.</p>",
)


def provider_settings() -> ProviderSettings:
    config = current_app.config
    return ProviderSettings(
        timeout=config["PROVIDER_TIMEOUT"],
        allow_private=config["ALLOW_PRIVATE_DESTINATIONS"],
        twilio_base_url=config["TWILIO_API_BASE_URL"],
        whatsapp_base_url=config["WHATSAPP_API_BASE_URL"],
        telegram_base_url=config["TELEGRAM_API_BASE_URL"],
    )


@shared_task(name=deliveries.TASK_NAME, bind=True)
def send_test(task: Task, attempt_id: str, destination: str, request_id: str | None = None) -> dict[str, Any]:
    request_id_var.set(request_id)  # the web request's id, in every line this task logs
    started_task = time.perf_counter()
    attempt_uuid = uuid.UUID(attempt_id)
    job = deliveries.claim_attempt(attempt_uuid)
    if job is None:
        outcome = Outcome(
            False, "this test was already started or closed; it is not sent twice", error_code=WORKER_ERROR
        )
        _log_task(task, attempt_id, None, "skipped", started_task)
        return outcome.as_dict()

    provider = build_provider(job.connector_type, provider_settings())
    started = time.perf_counter()
    try:
        provider.send(job.config, destination, TEST_MESSAGE)
    except DeliveryError as exc:
        outcome = Outcome(False, scrub(exc.message, provider.secrets(job.config)), error_code=exc.code)
    except Exception as exc:  # a bug or a library surprise: report it without its text, which may hold secrets
        log.error("test delivery %s failed unexpectedly: %s", attempt_id, type(exc).__name__)
        outcome = Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)
    else:
        outcome = Outcome(True, SUCCESS_MESSAGE, delivery_time_ms=deliveries.elapsed_ms(started))
    deliveries.finish_attempt(attempt_uuid, job.connector_id, outcome)
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
