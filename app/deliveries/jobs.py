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
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from flask import current_app
from sqlalchemy import select, update

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
from app.connectors.service import keyring, lock_for_verdict, open_config, record_verdict
from app.crypto import Sealed
from app.errors import with_database_retry
from app.events.service import announce
from app.extensions import db
from app.outcomes import TIMEOUT, WORKER_ERROR, Outcome
from app.outcomes import UNKNOWN as UNKNOWN_CODE
from app.queues import DISPATCH_QUEUE
from app.redact import MIN_SCRUBBABLE, forms, scrub, secrets_in_scope
from app.timeutil import db_now

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
    host_id: uuid.UUID | None = None
    queue: str = DISPATCH_QUEUE  # where a dispatch attempt's message takes its next step
    confirmable: bool = False  # its provider reports receipts the service can check (a message may wait for one)


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


def failure_message(
    error: DeliveryError, secrets: list[str], destination: str | None, mask: str, words: tuple[str, ...] = ()
) -> str:
    """Our words, always, and the provider's without any secret (withheld when a secret is too short to cut out
    cleanly), with the recipient's address masked (an SMTP 550 or a Twilio 21211 quotes it) and the message's own
    `words` (its subject and text, which a content filter may quote) cut out."""
    ours = scrub(error.message, secrets) or error.message  # ours hold no secret: scrubbed only to be sure
    if error.reply is None:
        scrubbed = ours
    else:
        reply = scrub(error.reply, secrets)
        scrubbed = f"{ours}: {reply}" if reply is not None else f"{ours} (the provider's answer is withheld)"
    if destination:
        for form in sorted({destination, destination.lstrip("+"), *forms(destination)}, key=len, reverse=True):
            scrubbed = re.sub(re.escape(form), mask, scrubbed, flags=re.IGNORECASE)
    for quoted in sorted((word for word in words if len(word) >= MIN_SCRUBBABLE), key=len, reverse=True):
        scrubbed = re.sub(re.escape(quoted), "[the message]", scrubbed, flags=re.IGNORECASE)
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
            callback = kind.callback_url(current_app.config["PUBLIC_BASE_URL"], job.connector_id, job.config)
            sent_id = provider.send(job.config, job.destination, replace(job.message, status_callback=callback))
            done = SUCCESS_MESSAGE if job.kind == TEST else DELIVERED_MESSAGE
            return Outcome(True, done, delivery_time_ms=elapsed_ms(started), provider_message_id=sent_id)
        except DeliveryError as exc:
            masked = kind.mask(job.destination) if job.destination else ""
            # A dispatch's words are the Host's; a test's are ours and public.
            words = (job.message.subject, job.message.text) if job.kind == MESSAGE and job.message else ()
            text = failure_message(exc, secrets, job.destination, masked, words)
            if exc.maybe_sent and job.kind != CHECK:
                # The provider may have taken it: a dispatch never sends it again through this connector.
                text = f"{text}; the provider may have accepted the message"[:MESSAGE_LIMIT]
                if job.kind == MESSAGE:
                    return Outcome(False, text, error_code=UNKNOWN_CODE)
            return Outcome(False, text, error_code=exc.code, retry_after=exc.retry_after)
        except Exception as exc:  # a bug or a library surprise: its text may hold secrets, the log scrubs them
            log.exception("attempt %s failed unexpectedly: %s", job.attempt_id, type(exc).__name__)
            return Outcome(False, "the worker failed unexpectedly", error_code=WORKER_ERROR)


def write_outcome(attempt_id: uuid.UUID, job: Job | None, outcome: Outcome, now: datetime | None = None) -> None:
    """Record an attempt's outcome and, when it says whether the claimed config works, the connector's
    is_verified; part of the caller's transaction, after any message lock (the one lock order)."""
    verdict = outcome.verdict(probe=job.kind != MESSAGE) if job is not None else None
    if verdict is not None:
        lock_for_verdict(job.connector_id)
    if outcome.success:
        status = VERIFIED if job is not None and job.kind == CHECK else SENT
    else:
        status = UNKNOWN if outcome.error_code == UNKNOWN_CODE else FAILED
    # A test or check the web or the sweep already closed (timeout, unknown) still gets its real outcome.
    db.session.execute(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == attempt_id, DeliveryAttempt.status.not_in(FINISHED))
        .values(
            status=status,
            error_code=outcome.error_code,
            message=outcome.message,
            delivery_time_ms=outcome.delivery_time_ms,
            finished_at=now or db_now(),
            destination_key_id=None,
            destination_sealed=None,
            provider_message_id=outcome.provider_message_id,
        )
    )
    if verdict is not None:
        record_verdict(job.connector_id, job.sealed, verdict, outcome.error_code, outcome.message)


# --- tests and checks ----------------------------------------------------------------------------------------


TOO_LATE = "it reached a worker after its deadline; it was not started"


def claim_probe(attempt_id: uuid.UUID, destination: str | None = None) -> Job | Outcome | None:
    """Take a pending test or check for its provider call, once, with the time its caller has left by the
    database's clock. A job that comes too late is closed as timeout (its Outcome); a redelivered copy, or one
    already closed, finds nothing (None). The claim is committed before the provider call."""
    now = db_now()
    row = db.session.execute(
        select(
            DeliveryAttempt.status,
            DeliveryAttempt.deadline_at,
            DeliveryAttempt.kind,
            DeliveryAttempt.connector_id,
            DeliveryAttempt.destination_key_id,
            DeliveryAttempt.destination_sealed,
        ).where(DeliveryAttempt.id == attempt_id)
    ).first()
    if row is None or row.status != PENDING:
        db.session.rollback()
        return None
    left = (row.deadline_at - now).total_seconds() if row.deadline_at else current_app.config["PROVIDER_TIMEOUT"]
    if left < MIN_SEND_SECONDS:  # the caller has given up (or is about to): acting now would surprise them
        outcome = Outcome(False, TOO_LATE, error_code=TIMEOUT)
        close_attempt(attempt_id, outcome, now)
        return outcome
    claimed = db.session.execute(
        update(DeliveryAttempt)
        .where(DeliveryAttempt.id == attempt_id, DeliveryAttempt.status == PENDING)
        .values(status=SENDING)
    ).rowcount
    connector = db.session.get(Connector, row.connector_id) if claimed and row.connector_id else None
    job = None
    if connector is not None:
        if row.destination_sealed is not None:  # `destination` comes only from a job queued by an older web
            sealed = Sealed(row.destination_key_id or "", row.destination_sealed)
            destination = keyring().open(connector.host_id, attempt_id, sealed)["destination"]
        job = Job(
            attempt_id=attempt_id,
            kind=row.kind,
            connector_id=connector.id,
            connector_type=connector.type,
            config=open_config(connector),
            sealed=connector.config_sealed,
            deadline=time.monotonic() + left,
            destination=destination if row.kind == TEST else None,
            message=TEST_MESSAGE if row.kind == TEST else None,
        )
    db.session.commit()
    return job


def close_attempt(attempt_id: uuid.UUID, outcome: Outcome, now: datetime | None = None) -> None:
    """Close a test or check that nobody will record: pending as timeout (it can no longer be claimed), sending
    as unknown (the worker may have died during the provider call). A worker still alive records its real
    outcome over either."""
    now = now or db_now()
    for status, closed_as in ((PENDING, TIMED_OUT if outcome.error_code == TIMEOUT else FAILED), (SENDING, UNKNOWN)):
        db.session.execute(
            update(DeliveryAttempt)
            .where(DeliveryAttempt.id == attempt_id, DeliveryAttempt.status == status)
            .values(
                status=closed_as,
                error_code=outcome.error_code,
                message=outcome.message,
                finished_at=now,
                destination_key_id=None,
                destination_sealed=None,
            )
        )
    db.session.commit()


def run_probe(attempt_id: uuid.UUID, destination: str | None) -> Ran:
    """A test or check end to end: claim, one provider call within the caller's deadline, record. The caller
    gets the outcome, or None for a copy of a job already taken."""
    try:
        claimed = with_database_retry(
            "claim", lambda: claim_probe(attempt_id, destination), seconds=current_app.config["PROVIDER_TIMEOUT"]
        )
    except Exception as exc:  # e.g. a config sealed under a key this worker does not have
        log.exception("attempt %s could not be prepared: %s", attempt_id, type(exc).__name__)
        db.session.rollback()
        outcome = Outcome(False, "the worker could not prepare the job", error_code=WORKER_ERROR)
        _record_probe(attempt_id, None, outcome)
        return Ran(outcome, "worker_error")
    if claimed is None:
        # A copy of a job already claimed (put back after a dropped broker connection) or closed: the claimant
        # answers; a result from this copy would reach the waiting request first, as a failure.
        return Ran(None, "skipped")
    if isinstance(claimed, Outcome):
        return Ran(claimed, "too_late")
    outcome = perform(claimed)
    _record_probe(attempt_id, claimed, outcome)
    done = "verified" if claimed.kind == CHECK else "sent"
    return Ran(outcome, done if outcome.success else str(outcome.error_code), claimed)


def _record_probe(attempt_id: uuid.UUID, job: Job | None, outcome: Outcome) -> None:
    def record() -> None:
        write_outcome(attempt_id, job, outcome)
        db.session.commit()
        announce()

    try:
        with_database_retry("record", record, seconds=RECORD_RETRY_SECONDS)
    except Exception as exc:  # the sweep closes the attempt; the caller still gets the result
        log.error("could not record the outcome of %s: %s", attempt_id, type(exc).__name__)
