from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timeutil import utcnow

# pending -> sending -> sent | failed. A caller that stops waiting closes a pending attempt as timeout; the
# sweep closes what is still open past its deadline: pending as timeout, sending as unknown (the provider
# call may have gone through). A worker still alive then records its real outcome over timeout or unknown.
PENDING, SENDING, SENT, FAILED, TIMEOUT, UNKNOWN = "pending", "sending", "sent", "failed", "timeout", "unknown"
OPEN = (PENDING, SENDING)
TEST, CHECK = "test", "check"
OPEN_FILTER = text("status IN ('pending', 'sending')")


class DeliveryAttempt(db.Model):
    """One test send or credential check: what was tried, how it ended. No secret, a masked destination."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (
        Index("ix_delivery_attempts_connector_created", "connector_id", "created_at"),
        # One test or check in flight per connector: a Host cannot pile up waits on one slow server.
        Index(
            "uq_delivery_attempts_one_open_per_connector",
            "connector_id",
            unique=True,
            postgresql_where=OPEN_FILTER,
            sqlite_where=OPEN_FILTER,
        ),
        # The sweep finds what is still open past its deadline.
        Index(
            "ix_delivery_attempts_open_deadline", "deadline_at", postgresql_where=OPEN_FILTER, sqlite_where=OPEN_FILTER
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    connector_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("connectors.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default=TEST, server_default=TEST)
    destination: Mapped[str | None] = mapped_column(String(320))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=PENDING)
    error_code: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    delivery_time_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # When the caller stops waiting: the worker does not start after it, and the sweep closes what is open.
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
