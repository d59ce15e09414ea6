"""Time as the service stores it: naive UTC, on the database's clock for every deadline, lease and due time."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select

from app.extensions import db


def utcnow() -> datetime:
    """This process's clock, naive UTC (SQLite keeps no time zone, so every stored time is UTC without one).

    Only for what no other process compares against: deadlines, leases and due times come from `db_now`."""
    return datetime.now(UTC).replace(tzinfo=None)


def db_now() -> datetime:
    """Now by the database's clock, naive UTC. Every process that writes or compares a deadline, a lease or a due
    time asks here, so a web or worker process whose own clock runs fast or slow cannot close another's attempt
    early or take a message before its time."""
    if db.session.get_bind().dialect.name == "postgresql":
        return db.session.scalar(select(func.timezone("UTC", func.clock_timestamp())))
    text = db.session.scalar(select(func.strftime("%Y-%m-%d %H:%M:%f", "now")))
    return datetime.fromisoformat(text)
