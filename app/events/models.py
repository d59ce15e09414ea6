from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timeutil import utcnow

EVENT_TYPES = (
    "connector.created",
    "connector.updated",
    "connector.deleted",
    "connector.verified",
    "connector.unverified",
    "message.delivered",
    "message.failed",
    "message.expired",
    "message.unknown",
    "message.unconfirmed",
)


class Event(db.Model):
    """The outbox: a change that other services must hear of, committed in the same transaction as the change.

    Its id orders the events and names them to receivers (`webhook-id` is `evt_<id>`, the same on every retry).
    Its data holds ids, types, statuses and our error text, never a secret or a full destination.
    """

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_pending", "delivered_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    host_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    # Webhook delivery (when EVENTS_WEBHOOK_URL is set): delivered, or given up after a day of retries.
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    abandoned_at: Mapped[datetime | None] = mapped_column(DateTime)
    tries: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_try_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
