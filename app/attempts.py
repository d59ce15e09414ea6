"""The attempt log: every test, check and dispatch attempt, shared by connectors, deliveries and messages."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timeutil import utcnow

# Tests and checks: pending -> sending -> sent (a test) | verified (a check, which sends nothing) | failed. A caller
# that stops waiting closes a pending attempt as timeout; the sweep closes what is still open past its deadline:
# pending as timeout, sending as unknown (the provider call may have gone through). A worker still alive then
# records its real outcome over either. Dispatch attempts start at sending: they are created by the claim itself.
PENDING, SENDING, SENT, VERIFIED, FAILED, TIMEOUT, UNKNOWN = (
    "pending", "sending", "sent", "verified", "failed", "timeout", "unknown"
)  # fmt: skip
STATUSES = (PENDING, SENDING, SENT, VERIFIED, FAILED, TIMEOUT, UNKNOWN)
FINISHED = (SENT, VERIFIED, FAILED)  # what a worker recorded
TEST, CHECK, MESSAGE = "test", "check", "message"
# Receipts, in the only order they may move: a late or repeated one changes nothing.
RECEIPT_UNDELIVERED, RECEIPT_DELIVERED, RECEIPT_READ = "undelivered", "delivered", "read"
RECEIPTS = (RECEIPT_UNDELIVERED, RECEIPT_DELIVERED, RECEIPT_READ)
OPEN_FILTER = text("status IN ('pending', 'sending')")
OPEN_PROBE_FILTER = text("status IN ('pending', 'sending') AND kind IN ('test', 'check')")
PROBE_FILTER = text("kind IN ('test', 'check')")


class DeliveryAttempt(db.Model):
    """One test send, credential check or dispatch attempt: what was tried, how it ended.

    No secret and no text; the destination is masked.
    """

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        Index("ix_delivery_attempts_connector_created", "connector_id", "created_at"),
        # One test or check in flight per connector: a Host cannot pile up waits on one slow server.
        Index(
            "uq_delivery_attempts_one_open_per_connector",
            "connector_id",
            unique=True,
            postgresql_where=OPEN_PROBE_FILTER,
            sqlite_where=OPEN_PROBE_FILTER,
        ),
        # The sweep finds what is still open past its deadline.
        Index(
            "ix_delivery_attempts_open_deadline", "deadline_at", postgresql_where=OPEN_FILTER, sqlite_where=OPEN_FILTER
        ),
        # Retention keeps each connector's latest 20 tests and checks: found without reading its dispatch attempts.
        Index(
            "ix_delivery_attempts_probe_connector_created",
            "connector_id",
            "created_at",
            postgresql_where=PROBE_FILTER,
            sqlite_where=PROBE_FILTER,
        ),
        # A provider's receipt finds its attempt by the connector and the provider's id of the message.
        Index("ix_delivery_attempts_connector_provider_message", "connector_id", "provider_message_id"),
        # At most once per connector and round of a message: a second claim of the same send fails here.
        Index("uq_delivery_attempts_message_connector_round", "message_id", "connector_id", "round", unique=True),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # A dispatch attempt outlives its connector (the message's history); a test or check goes with it.
    connector_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("connectors.id", ondelete="SET NULL"))
    connector_type: Mapped[str | None] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default=TEST, server_default=TEST)
    message_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("messages.id", ondelete="CASCADE"))
    round: Mapped[int | None] = mapped_column(Integer)
    destination: Mapped[str | None] = mapped_column(String(320))  # masked
    # A test's full destination, sealed under the Host's key for the worker (the broker carries only the
    # attempt's id), and erased once the attempt is over.
    destination_key_id: Mapped[str | None] = mapped_column(String(32))
    destination_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=PENDING)
    error_code: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    delivery_time_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # Tests and checks: when the caller stops waiting. Dispatch: the lease of the provider call.
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The provider's id of what it accepted (Twilio SID, WhatsApp wamid, Telegram message_id, the email's
    # Message-ID), and what its receipts said of it since: None, delivered, read or undelivered (forward only).
    provider_message_id: Mapped[str | None] = mapped_column(String(128))
    receipt: Mapped[str | None] = mapped_column(String(16))
    receipt_at: Mapped[datetime | None] = mapped_column(DateTime)
