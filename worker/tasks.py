"""Celery tasks. Thin: they take ids, load what they need, call one provider, record the outcome."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task, shared_task
from celery.exceptions import Ignore
from flask import current_app

from app.channels import channel
from app.channels.base import DeliveryError, OutgoingMessage, Provider, ProviderSettings
from app.deliveries import service as deliveries
from app.errors import DATABASE_DOWN, discard_session
from app.events import service as events
from app.events.webhook import post_event
from app.logs import request_id_var
from app.messages import service as messages
from app.outcomes import TIMEOUT, WORKER_ERROR, Outcome
from app.queues import CHECK_SCHEDULE, SWEEP, nudge
from app.redact import forms, scrub, secrets_in_scope
from app.timeutil import utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECK_SUCCESS = "Credentials and sender verified; nothing was sent"
TEST_MESSAGE = OutgoingMessage(
    subject="BAPBA connector test",
    text="This is a test message from your BAPBA connector. If you can read it, the channel works.",
    html="<p>This is a test message from your <b>BAPBA</b> connector. If you can read it, the channel works.</p>",
)
MESSAGE_LIMIT = 500
# Below this much time left before the caller's deadline, a job is not started at all.
MIN_SEND_SECONDS = 0.2
# Recording an outcome waits this long for the database to come back; after it, the sweep closes the attempt.
RECORD_RETRY_SECONDS = 60.0


def provider_settings(budget: float) -> ProviderSettings:
    config = current_app.config
    return ProviderSettings(
        timeout=budget,
        allow_private=config["ALLOW_PRIVATE_DESTINATIONS"],
        twilio_base_url=config["TWILIO_API_BASE_URL"],
        whatsapp_base_url=config["WHATSAPP_API_BASE_URL"],
        telegram_base_url=config["TELEGRAM_API_BASE_URL"],
    )


def with_database_retry(what: str, call: Callable[[], T], seconds: float = RECORD_RETRY_SECONDS) -> T:
    """`call()`, tried again while the database cannot be reached, for up to `seconds`; each failure logged."""
    give_up = time.monotonic() + seconds
    pause = 0.2
    while True:
        try:
            return call()
        except DATABASE_DOWN as exc:
            discard_session()
            if time.monotonic() + pause > give_up:
                raise
            log.warning("%s: the database is unavailable (%s), trying again in %.1f s", what, type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def failure_message(error: DeliveryError, secrets: list[str], destination: str | None = None, mask: str = "") -> str:
    """The provider's words without any secret, and with the recipient's address masked (an SMTP 550 or a Twilio
    21211 quotes it); ours alone when a secret is too short to cut out."""
    scrubbed = scrub(error.message, secrets)
    if scrubbed is None:
        return f"the provider refused the request ({error.code}); its answer is withheld"
    if destination:
        for form in sorted({destination, destination.lstrip("+"), *forms(destination)}, key=len, reverse=True):
            scrubbed = re.sub(re.escape(form), mask, scrubbed, flags=re.IGNORECASE)
    return scrubbed[:MESSAGE_LIMIT]  # scrubbed before cut: a cut secret would no longer be recognised


@shared_task(name=deliveries.SEND_TEST, bind=True)
def send_test(
    task: Task, attempt_id: str, destination: str, request_id: str | None = None, deadline: float | None = None
) -> dict[str, Any]:
    """A test message to `destination`, for a Host waiting on the answer."""

    def send(provider: Provider, config: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        provider.send(config, destination, TEST_MESSAGE)
        return Outcome(True, deliveries.SUCCESS_MESSAGE, delivery_time_ms=deliveries.elapsed_ms(started))

    return _probe(task, "test", attempt_id, send, request_id, deadline, destination)


@shared_task(name=deliveries.CHECK_CONNECTOR, bind=True)
def check_connector(
    task: Task, attempt_id: str, request_id: str | None = None, deadline: float | None = None
) -> dict[str, Any]:
    """Prove the credentials and the sender without delivering anything (a Host's check, or the re-check)."""

    def check(provider: Provider, config: dict[str, Any]) -> Outcome:
        started = time.perf_counter()
        details = provider.verify(config)
        return Outcome(True, CHECK_SUCCESS, delivery_time_ms=deliveries.elapsed_ms(started), details=details)

    return _probe(task, "check", attempt_id, check, request_id, deadline)


def _probe(
    task: Task,
    what: str,
    attempt_id: str,
    action: Callable[[Provider, dict[str, Any]], Outcome],
    request_id: str | None,
    deadline: float | None,
    destination: str | None = None,
) -> dict[str, Any]:
    """Claim the attempt, run `action` against the provider within the caller's deadline, record the outcome."""
    request_id_var.set(request_id)  # the web request's id, in every line this task logs
    started_task = time.perf_counter()
    attempt_uuid = uuid.UUID(attempt_id)
    budget = current_app.config["PROVIDER_TIMEOUT"]
    if deadline is not None:
        budget = min(budget, deadline - time.time())
    if budget < MIN_SEND_SECONDS:  # the caller has given up (or is about to): acting now would surprise them
        outcome = Outcome(False, f"the {what} reached a worker too late; it was not started", error_code=TIMEOUT)
        with_database_retry("close", lambda: deliveries.close_open(attempt_uuid, outcome), seconds=5)
        _log_task(task, what, attempt_id, None, "too_late", started_task)
        return outcome.as_dict()

    try:
        job = with_database_retry("claim", lambda: deliveries.claim_attempt(attempt_uuid), seconds=budget)
    except Exception as exc:  # e.g. a config sealed under a key this worker does not have
        log.exception("%s %s could not be prepared: %s", what, attempt_id, type(exc).__name__)
        outcome = Outcome(False, f"the worker could not prepare the {what}", error_code=WORKER_ERROR)
        _record(attempt_uuid, None, outcome)
        _log_task(task, what, attempt_id, None, "worker_error", started_task)
        return outcome.as_dict()
    if job is None:
        # A copy of a job already claimed (put back after a dropped broker connection) or closed: the claimant
        # answers; a result from this copy would reach the waiting request first, as a failure.
        _log_task(task, what, attempt_id, None, "skipped", started_task)
        raise Ignore()

    kind = channel(job.connector_type)
    provider = kind.provider(provider_settings(budget))
    secrets = provider.secrets(job.config)
    masked = kind.mask(destination) if destination else ""
    with secrets_in_scope(secrets):
        try:
            outcome = action(provider, job.config)
        except DeliveryError as exc:
            outcome = Outcome(False, failure_message(exc, secrets, destination, masked), error_code=exc.code)
        except Exception as exc:  # a bug or a library surprise: its text may hold secrets, the log scrubs them
            log.exception("%s %s failed unexpectedly: %s", what, attempt_id, type(exc).__name__)
            outcome = Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)
    _record(attempt_uuid, job, outcome)
    done = "sent" if what == "test" else "verified"
    _log_task(
        task, what, attempt_id, job.connector_id, done if outcome.success else str(outcome.error_code), started_task
    )
    return outcome.as_dict()


def _record(attempt_id: uuid.UUID, job: deliveries.Job | None, outcome: Outcome) -> None:
    try:
        with_database_retry("record", lambda: deliveries.finish_attempt(attempt_id, job, outcome))
    except Exception as exc:  # the sweep closes the attempt; the caller still gets the result
        log.error("could not record the outcome of %s: %s", attempt_id, type(exc).__name__)


def _log_task(
    task: Task, what: str, attempt_id: str, connector_id: uuid.UUID | None, outcome: str, started: float
) -> None:
    queue = (task.request.delivery_info or {}).get("routing_key")
    log.info(
        "%s %s: %s",
        "test delivery" if what == "test" else what,
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


class _Expired(Exception):
    """The message's life ran out between the claim and the provider call."""


# --- dispatch ------------------------------------------------------------------------------------------------


@shared_task(name=messages.ADVANCE_MESSAGE, ignore_result=True)
def advance_message(message_id: str) -> None:
    """Decide a message's next step and queue its send on the connector type's queue."""
    step = with_database_retry("advance", lambda: messages.advance(uuid.UUID(message_id)))
    if step is not None:
        nudge(
            messages.SEND_MESSAGE, str(step.message_id), str(step.connector_id), step.round, queue=step.connector_type
        )


@shared_task(name=messages.SEND_MESSAGE, ignore_result=True)
def send_message(message_id: str, connector_id: str, round_: int) -> None:
    """One provider call for one message through one connector, claimed in the database first."""
    message_uuid = uuid.UUID(message_id)
    job = with_database_retry("claim", lambda: messages.claim_send(message_uuid, uuid.UUID(connector_id), round_))
    if job is None:  # no longer to be made (already made, expired, connector gone): let advance decide
        nudge(messages.ADVANCE_MESSAGE, message_id)
        return
    kind = channel(job.connector_type)
    secrets = kind.provider(provider_settings(0)).secrets(job.config)
    retry_after = None
    with secrets_in_scope(secrets):
        started = time.perf_counter()
        left = (job.expires_at - utcnow()).total_seconds()  # nothing is sent after expires_at: checked right now
        try:
            if left < MIN_SEND_SECONDS:
                raise _Expired
            provider = kind.provider(provider_settings(min(current_app.config["PROVIDER_TIMEOUT"], left)))
            provider.send(job.config, job.destination, job.message)
        except _Expired:
            outcome = Outcome(
                False, "the message expired before the provider call; it was not sent", error_code=TIMEOUT
            )
        except DeliveryError as exc:
            masked = kind.mask(job.destination)
            outcome = Outcome(False, failure_message(exc, secrets, job.destination, masked), error_code=exc.code)
            retry_after = exc.retry_after
        except Exception as exc:  # a bug or a library surprise: its text may hold secrets, the log scrubs them
            log.exception("message %s failed unexpectedly: %s", message_id, type(exc).__name__)
            outcome = Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)
        else:
            outcome = Outcome(True, "delivered", delivery_time_ms=deliveries.elapsed_ms(started))
    log.info(
        "message %s through %s: %s",
        message_id,
        job.connector_type,
        "sent" if outcome.success else outcome.error_code,
        extra={"fields": {"message_id": message_id, "connector_id": connector_id, "outcome": outcome.error_code}},
    )
    try:
        more = with_database_retry("record", lambda: messages.finish_send(job, outcome, retry_after))
    except Exception as exc:  # the lease runs out and advance closes the attempt as unknown
        log.error("could not record the outcome of message %s: %s", message_id, type(exc).__name__)
        return
    if more:
        nudge(messages.ADVANCE_MESSAGE, message_id)


# --- periodic -------------------------------------------------------------------------------------------------


@shared_task(name=SWEEP)
def sweep() -> dict[str, int]:
    """Celery beat, every SWEEP_INTERVAL: close and advance what no job will (lost jobs, dead workers, rounds
    due, expiry). Idempotent, so two beats by mistake do no harm."""
    closed = deliveries.close_overdue()
    due = messages.due_messages()
    for message_id in due:
        nudge(messages.ADVANCE_MESSAGE, str(message_id))
    if current_app.config["EVENTS_WEBHOOK_URL"] and events.has_due():
        nudge(events.DELIVER_EVENTS)
    return {"attempts_closed": closed, "messages_advanced": len(due), "events_pruned": events.prune()}


@shared_task(name=CHECK_SCHEDULE)
def schedule_checks() -> int:
    """Celery beat: queue the re-checks that are due (each connector once per CONNECTOR_CHECK_INTERVAL)."""
    scheduled = with_database_retry("schedule checks", deliveries.schedule_checks, seconds=10)
    for attempt_id, connector_type, deadline in scheduled:
        current_app.extensions["celery"].signature(
            deliveries.CHECK_CONNECTOR,
            args=(str(attempt_id),),
            kwargs={"deadline": deadline},
            queue=connector_type,
            expires=max(deadline - time.time(), 1),
        ).apply_async()
    return len(scheduled)


@shared_task(name=events.DELIVER_EVENTS, ignore_result=True)
def deliver_events() -> int:
    """Send the outbox to EVENTS_WEBHOOK_URL, oldest first; stops at the first failure (order is kept)."""
    config = current_app.config
    if not config["EVENTS_WEBHOOK_URL"]:
        return 0
    timeout = config["PROVIDER_TIMEOUT"]
    sent = 0
    for _ in range(500):  # a bounded batch; the next nudge or sweep takes the rest
        claimed = with_database_retry("claim event", lambda: events.claim_next(lease_seconds=timeout * 2 + 5))
        if claimed is None:
            break
        error = post_event(
            config["EVENTS_WEBHOOK_URL"], config["EVENTS_WEBHOOK_SECRET"], claimed.id, claimed.payload, timeout
        )
        with_database_retry("record event", lambda c=claimed, e=error: events.record_try(c, e))
        if error is not None:
            break
        sent += 1
    return sent
