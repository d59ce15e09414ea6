from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timeutil import utcnow


class Connector(db.Model):
    __tablename__ = "connectors"
    # The database, not the application, decides who wins two concurrent creates of one (type, name).
    __table_args__ = (
        UniqueConstraint("host_id", "type", "name", name="uq_connectors_host_type_name"),
        # Serves the list endpoint's filter and order from one index, however many Hosts share the table.
        Index("ix_connectors_host_order", "host_id", "priority", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    host_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("hosts.id", ondelete="CASCADE"), nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    is_verified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    config_key_id: Mapped[str] = mapped_column(String(32), nullable=False)
    config_sealed: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow, onupdate=utcnow)
    # When the daily re-check is due: a test or check pushes it a whole interval on; new connectors are spread
    # over the interval so that they are not all checked at once.
    next_check_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)
