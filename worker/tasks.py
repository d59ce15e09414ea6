"""Celery tasks. Thin: they take ids, load what they need, call one provider, record the outcome."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import shared_task
from flask import current_app

from app.deliveries import service as deliveries
from app.deliveries.service import SUCCESS_MESSAGE, Outcome
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


@shared_task(name=deliveries.TASK_NAME)
def send_test(attempt_id: str, destination: str) -> dict[str, Any]:
    attempt_uuid = uuid.UUID(attempt_id)
    job = deliveries.claim_attempt(attempt_uuid)
    if job is None:
        log.info("test delivery %s already claimed or closed; not sending", attempt_id)
        return Outcome(False, "this test was already handled", error_code=WORKER_ERROR).as_dict()

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
    log.info(
        "test delivery %s via %s: %s",
        attempt_id,
        job.connector_type,
        "sent" if outcome.success else outcome.error_code,
    )
    return outcome.as_dict()
