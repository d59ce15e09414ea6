from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, DateTime, LargeBinary, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timeutil import utcnow


class Host(db.Model):
    """A will's owner, known by the `sub` of their token; created on first use."""

    __tablename__ = "hosts"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    will_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, nullable=False, default=utcnow, onupdate=utcnow)
    # The key of the Host's idempotency digests, random and sealed under the master key like a config: a
    # rotation re-seals it, so digests made before the rotation still recognise a replay after it.
    digest_key_id: Mapped[str | None] = mapped_column(String(32))
    digest_key_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
