from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timeutil import utcnow

# pending -> sending -> sent | failed. When the caller stops waiting, pending or sending -> timeout (or failed
# if the job could not be queued); a worker still alive then records its real outcome over it.
PENDING, SENDING, SENT, FAILED, TIMEOUT = "pending", "sending", "sent", "failed", "timeout"


class DeliveryAttempt(db.Model):
    """One test send: what was tried, how it ended. Holds no secret and only a masked destination."""

    __tablename__ = "delivery_attempts"
    __table_args__ = (Index("ix_delivery_attempts_connector_created", "connector_id", "created_at"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    connector_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("connectors.id", ondelete="CASCADE"), nullable=False
    )
    destination: Mapped[str] = mapped_column(String(320), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=PENDING)
    error_code: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    delivery_time_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
