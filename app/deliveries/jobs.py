"""One road for every attempt: a claimed job, one provider call within its deadline, one way to record it.

Tests, checks and dispatch attempts all take it. A claim (a test's or check's here, a message's in
`app.messages.dispatch`) commits the attempt before the provider call; `perform` makes the call and turns
whatever happens into an `Outcome` that holds no secret; `write_outcome` records it with the provider's verdict
on the connector. Nothing here holds a database connection during the provider call.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import update

from app.attempts import (
    CHECK,
    FAILED,
    FINISHED,
    MESSAGE,
    PENDING,
    SENDING,
    SENT,
    TEST,
    UNKNOWN,
    VERIFIED,
    DeliveryAttempt,
)
from app.attempts import TIMEOUT as TIMED_OUT
from app.channels import channel
from app.channels.base import DeliveryError, OutgoingMessage, ProviderSettings
from app.connectors.models import Connector
from app.connectors.service import lock_for_verdict, open_config, record_verdict
from app.errors import with_database_retry
from app.events.service import announce
from app.extensions import db
from app.outcomes import TIMEOUT, WORKER_ERROR, Outcome
from app.redact import forms, scrub, secrets_in_scope
from app.timeutil import utcnow

log = logging.getLogger(__name__)

TEST_MESSAGE = OutgoingMessage(
    subject="BAPBA connector test",
    text="This is a test message from your BAPBA connector. If you can read it, the channel works.",
    html="<p>This is a test message from your <b>BAPBA</b> connector. If you can read it, the channel works.</p>",
)
SUCCESS_MESSAGE = "Test message sent successfully"
CHECK_SUCCESS = "Credentials and sender verified; nothing was sent"
DELIVERED_MESSAGE = "delivered"
MESSAGE_LIMIT = 500
# Below this much time left before a job's deadline (the caller's, or the message's expiry), no provider call
# is started: it could not finish, and acting after the deadline would surprise whoever set it.
MIN_SEND_SECONDS = 0.2
# Recording an outcome waits this long for the database to come back; after it, the sweep closes the attempt.
RECORD_RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class Job:
    """An attempt claimed for one provider call: what the provider needs, and what recording needs."""

    attempt_id: uuid.UUID
    kind: str  # TEST, CHECK or MESSAGE (app.attempts)
    connector_id: uuid.UUID
    connector_type: str
    config: dict[str, Any]
    sealed: bytes  # the config as sealed when claimed: a verdict counts only for that config
    deadline: float  # time.monotonic() by which the provider call must be over
    destination: str | None = None  # none for a check
    message: OutgoingMessage | None = None  # none for a check
    message_id: uuid.UUID | None = None  # a dispatch attempt's message


@dataclass(frozen=True)
class Ran:
    """What a task reports of a job: its outcome (None for a copy of a job already taken) and a word for the log."""

    outcome: Outcome | None
    label: str
    job: Job | None = None


def elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def provider_settings(budget: float) -> ProviderSettings:
    config = current_app.config
    return ProviderSettings(
        timeout=budget,
        allow_private=config["ALLOW_PRIVATE_DESTINATIONS"],
        twilio_base_url=config["TWILIO_API_BASE_URL"],
        whatsapp_base_url=config["WHATSAPP_API_BASE_URL"],
        telegram_base_url=config["TELEGRAM_API_BASE_URL"],
    )


def failure_message(error: DeliveryError, secrets: list[str], destination: str | None, mask: str) -> str:
    """Our words, always, and the provider's without any secret (withheld when a secret is too short to cut out
    cleanly), with the recipient's address masked (an SMTP 550 or a Twilio 21211 quotes it)."""
    ours = scrub(error.message, secrets) or error.message  # ours hold no secret: scrubbed only to be sure
    if error.reply is None:
        scrubbed = ours
    else:
        reply = scrub(error.reply, secrets)
        scrubbed = f"{ours}: {reply}" if reply is not None else f"{ours} (the provider's answer is withheld)"
    if destination:
        for form in sorted({destination, destination.lstrip("+"), *forms(destination)}, key=len, reverse=True):
            scrubbed = re.sub(re.escape(form), mask, scrubbed, flags=re.IGNORECASE)
    return scrubbed[:MESSAGE_LIMIT]  # scrubbed before cut: a cut secret would no longer be recognised


def perform(job: Job) -> Outcome:
    """The job's one provider call (a send, or a check that sends nothing), cut off at its deadline; whatever
    happens comes back as an Outcome without any secret."""
    kind = channel(job.connector_type)
    budget = min(current_app.config["PROVIDER_TIMEOUT"], job.deadline - time.monotonic())
    if budget < MIN_SEND_SECONDS:
        return Outcome(False, "the deadline came before the provider call; nothing was sent", error_code=TIMEOUT)
    provider = kind.provider(provider_settings(budget))
    secrets = provider.secrets(job.config)
    with secrets_in_scope(secrets):  # every line logged meanwhile is scrubbed of them
        started = time.perf_counter()
        try:
            if job.kind == CHECK:
                details = provider.verify(job.config)
                return Outcome(True, CHECK_SUCCESS, delivery_time_ms=elapsed_ms(started), details=details)
            assert job.destination is not None and job.message is not None
            provider.send(job.config, job.destination, job.message)
            done = SUCCESS_MESSAGE if job.kind == TEST else DELIVERED_MESSAGE
            return Outcome(True, done, delivery_time_ms=elapsed_ms(started))
        except DeliveryError as exc:
            masked = kind.mask(job.destination) if job.destination else ""
            return Outcome(
                False,
                failure_message(exc, secrets, job.destination, masked),
                error_code=exc.code,
                retry_after=exc.retry_after,
            )
        except Exception as exc:  # a bug or a library surprise: its text may hold secrets, the log scrubs them
            log.exception("attempt %s failed unexpectedly: %s", job.attempt_id, type(exc).__name__)
            return Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)


def write_outcome(attempt_id: uuid.UUID, job: Job | None, outcome: Outcome) -> None:
    """Record an attempt's outcome and, when it says whether the claimed config works, the connector's
    is_verified; part of the caller's transaction, after any message lock (the one lock order)."""
    verdict = outcome.verdict(probe=job.kind != MESSAGE) if job is not None else None
    if verdict is not None:
        lock_for_verdict(job.connector_id)
    status = FAILED if not outcome.success else VERIFIED if job is not None and job.kind == CHECK else SENT
    # A test or check the web or the sweep already closed (timeout, unknown) still gets its real outcome.
    db.session.execute(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == attempt_id, DeliveryAttempt.status.not_in(FINISHED))
        .values(
            status=status,
            error_code=outcome.error_code,
            message=outcome.message,
            delivery_time_ms=outcome.delivery_time_ms,
            finished_at=utcnow(),
        )
    )
    if verdict is not None:
        record_verdict(job.connector_id, job.sealed, verdict, outcome.error_code, outcome.message)


# --- tests and checks ----------------------------------------------------------------------------------------


def claim_probe(attempt_id: uuid.UUID, deadline: float, destination: str | None = None) -> Job | None:
    """Take a pending test or check for its provider call, once: a redelivered or expired job finds nothing.

    The claim is committed before the provider call, and no connection is held during it.
    """
    claimed = db.session.execute(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == attempt_id, DeliveryAttempt.status == PENDING)
        .values(status=SENDING)
        .returning(DeliveryAttempt.connector_id, DeliveryAttempt.kind)
    ).first()
    connector = db.session.get(Connector, claimed.connector_id) if claimed is not None else None
    job = None
    if connector is not None:
        job = Job(
            attempt_id=attempt_id,
            kind=claimed.kind,
            connector_id=connector.id,
            connector_type=connector.type,
            config=open_config(connector),
            sealed=connector.config_sealed,
            deadline=deadline,
            destination=destination if claimed.kind == TEST else None,
            message=TEST_MESSAGE if claimed.kind == TEST else None,
        )
    db.session.commit()
    return job


def close_attempt(attempt_id: uuid.UUID, outcome: Outcome) -> None:
    """Close a test or check that nobody will record: pending as timeout (it can no longer be claimed), sending
    as unknown (the worker may have died during the provider call). A worker still alive records its real
    outcome over either."""
    now = utcnow()
    for status, closed_as in ((PENDING, TIMED_OUT if outcome.error_code == TIMEOUT else FAILED), (SENDING, UNKNOWN)):
        db.session.execute(
            update(DeliveryAttempt)
            .where(DeliveryAttempt.id == attempt_id, DeliveryAttempt.status == status)
            .values(status=closed_as, error_code=outcome.error_code, message=outcome.message, finished_at=now)
        )
    db.session.commit()


def run_probe(attempt_id: uuid.UUID, destination: str | None, deadline: float | None) -> Ran:
    """A test or check end to end: claim, one provider call within the caller's deadline (wall-clock seconds,
    as the web set it), record. The caller gets the outcome, or None for a copy of a job already taken."""
    left = current_app.config["PROVIDER_TIMEOUT"] if deadline is None else deadline - time.time()
    if left < MIN_SEND_SECONDS:  # the caller has given up (or is about to): acting now would surprise them
        outcome = Outcome(False, "it reached a worker after its deadline; it was not started", error_code=TIMEOUT)
        with_database_retry("close", lambda: close_attempt(attempt_id, outcome), seconds=5)
        return Ran(outcome, "too_late")
    until = time.monotonic() + left
    try:
        job = with_database_retry("claim", lambda: claim_probe(attempt_id, until, destination), seconds=left)
    except Exception as exc:  # e.g. a config sealed under a key this worker does not have
        log.exception("attempt %s could not be prepared: %s", attempt_id, type(exc).__name__)
        db.session.rollback()
        outcome = Outcome(False, "the worker could not prepare the job", error_code=WORKER_ERROR)
        _record_probe(attempt_id, None, outcome)
        return Ran(outcome, "worker_error")
    if job is None:
        # A copy of a job already claimed (put back after a dropped broker connection) or closed: the claimant
        # answers; a result from this copy would reach the waiting request first, as a failure.
        return Ran(None, "skipped")
    outcome = perform(job)
    _record_probe(attempt_id, job, outcome)
    done = "verified" if job.kind == CHECK else "sent"
    return Ran(outcome, done if outcome.success else str(outcome.error_code), job)


def _record_probe(attempt_id: uuid.UUID, job: Job | None, outcome: Outcome) -> None:
    def record() -> None:
        write_outcome(attempt_id, job, outcome)
        db.session.commit()
        announce()

    try:
        with_database_retry("record", record, seconds=RECORD_RETRY_SECONDS)
    except Exception as exc:  # the sweep closes the attempt; the caller still gets the result
        log.error("could not record the outcome of %s: %s", attempt_id, type(exc).__name__)
