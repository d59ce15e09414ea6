from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timeutil import utcnow

# queued -> sending -> delivered | failed | expired | unknown, with retrying between rounds. A message that ends
# without a delivery but after an attempt the provider may have taken ends `unknown`, not failed or expired:
# those would say nothing was sent. A message asked to be confirmed waits `sent` after a provider accepted it,
# until a receipt confirms (delivered) or the next channel is tried; nothing confirmed by its expiry: unconfirmed.
QUEUED, SENDING, SENT, RETRYING, DELIVERED, FAILED, EXPIRED, UNKNOWN, UNCONFIRMED = (
    "queued",
    "sending",
    "sent",
    "retrying",
    "delivered",
    "failed",
    "expired",
    "unknown",
    "unconfirmed",
)
IN_FLIGHT = (QUEUED, SENDING, SENT, RETRYING)
FINAL = (DELIVERED, FAILED, EXPIRED, UNKNOWN, UNCONFIRMED)
CONFIRM_DELIVERED = "delivered"
STATUSES = (*IN_FLIGHT, *FINAL)
OTP = "otp"
PURPOSES = (OTP, "notification", "liveness")


class Message(db.Model):
    """A notification or OTP to deliver through a Host's connectors; the database is its only source of truth.

    Its words and full addresses are sealed under the Host's key and erased once it is final; what stays is the
    masked recipient and the attempts.
    """

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("host_id", "idempotency_key", name="uq_messages_host_idempotency_key"),
        Index("ix_messages_host_created", "host_id", "created_at"),
        # The sweep's question: which unfinished messages are due for a look?
        Index("ix_messages_status_due", "status", "due_at"),
        # Retention: which messages ended long enough ago to be forgotten?
        Index("ix_messages_finished_at", "finished_at"),
        # Fairness: how many of a Host's messages are being sent right now?
        Index("ix_messages_host_status", "host_id", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    host_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False)
    request_digest: Mapped[str] = mapped_column(String(64), nullable=False)
    purpose: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=QUEUED)
    routes: Mapped[list[str]] = mapped_column(JSON, nullable=False)  # connector types that can reach the recipient
    recipient_masked: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)
    round: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    # When someone must look at the message next (a round's backoff, a lease, a lost job); none once final.
    due_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The earliest the next round may start, when a provider asked us to wait (a 429's Retry-After).
    not_before: Mapped[datetime | None] = mapped_column(DateTime)
    expires_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)  # when it reached a final status
    # Asked of the message: a provider's acceptance is not enough, a receipt must confirm it within
    # `confirm_within` seconds, or the next channel is tried.
    confirm_by: Mapped[str | None] = mapped_column(String(16))
    confirm_within: Mapped[int | None] = mapped_column(Integer)
    delivered_via_connector_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    delivered_via_type: Mapped[str | None] = mapped_column(String(16))
    body_key_id: Mapped[str | None] = mapped_column(String(32))
    body_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)

    @property
    def delivered_via(self) -> dict[str, object] | None:
        if self.delivered_via_type is None:
            return None
        return {"connector_id": self.delivered_via_connector_id, "type": self.delivered_via_type}
