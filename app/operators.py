"""Read-only commands for operators: what a Host's connectors, the messages and the events look like, without SQL.

`flask --app wsgi connectors HOST_ID`, `messages [--host H] [--status S]`, `message ID` and `events --after N`.
Each reads through the services the API uses and shows what the API shows, through the API's own schemas:
never a secret, never a message's words, destinations masked. Aligned columns for a person, or `--json`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
from flask import Flask
from sqlalchemy import select

from app.attempts import DeliveryAttempt
from app.auth.models import Host
from app.connectors.schemas import ConnectorSchema
from app.connectors.service import list_connectors
from app.deliveries.schemas import AttemptSchema
from app.errors import DATABASE_DOWN, NotFoundError, ServiceError
from app.events.routes import EventSchema
from app.events.service import as_json, list_events
from app.extensions import db
from app.messages.models import STATUSES, Message
from app.messages.schemas import MessageSchema
from app.messages.service import get_message, list_messages, view, views

MAX_ROWS = 1000


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """An unknown id or an unreachable database is one line and exit status 1, never a traceback."""
    try:
        yield
    except ServiceError as error:
        raise click.ClickException(error.message) from None
    except DATABASE_DOWN as error:
        raise click.ClickException(f"the database cannot be reached ({type(error).__name__})") from None
    finally:
        db.session.rollback()


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    # Provider text can hold line breaks or terminal escapes: a table cell shows neither.
    return "".join(char if char.isprintable() else " " for char in str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(header), *(len(row[index]) for row in cells)) for index, header in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _echo(data: Any, json_output: bool, human: Callable[[], str]) -> None:
    click.echo(json.dumps(data, indent=2) if json_output else human())


def _require_host(host_id: uuid.UUID) -> None:
    if db.session.get(Host, host_id) is None:
        raise click.ClickException(f"Host {host_id} not found")


def last_attempt(connector_id: uuid.UUID) -> DeliveryAttempt | None:
    """The connector's latest test, check or dispatch attempt: the first of its deliveries list."""
    query = (
        select(DeliveryAttempt)
        .where(DeliveryAttempt.connector_id == connector_id)
        .order_by(DeliveryAttempt.created_at.desc(), DeliveryAttempt.id.desc())
        .limit(1)
    )
    return db.session.scalars(query).first()


def connectors_with_last_attempt(host_id: uuid.UUID) -> list[dict[str, Any]]:
    """The Host's connectors as the API lists them, each with its latest attempt as the API shows it."""
    shown = []
    for connector in list_connectors(host_id):
        latest = last_attempt(connector.id)
        shown.append(
            {**ConnectorSchema().dump(connector), "last_attempt": AttemptSchema().dump(latest) if latest else None}
        )
    return shown


def recent_messages(status: str | None, limit: int) -> list[Message]:
    """Every Host's messages, newest first, as `list_messages` orders one Host's."""
    query = select(Message)
    if status:
        query = query.where(Message.status == status)
    return list(db.session.scalars(query.order_by(Message.created_at.desc(), Message.id.desc()).limit(limit)))


def _connectors_text(host_id: uuid.UUID, connectors: list[dict[str, Any]]) -> str:
    if not connectors:
        return f"Host {host_id} has no connectors"
    headers = ("ID", "TYPE", "NAME", "PRIORITY", "VERIFIED", "LAST ATTEMPT", "KIND", "STATUS", "ERROR")
    rows = []
    for connector in connectors:
        last = connector["last_attempt"] or {}
        rows.append(
            (
                connector["id"],
                connector["type"],
                connector["name"],
                connector["priority"],
                connector["is_verified"],
                last.get("created_at"),
                last.get("kind"),
                last.get("status"),
                last.get("error_code"),
            )
        )
    return _table(headers, rows)


def _messages_text(messages: list[dict[str, Any]]) -> str:
    if not messages:
        return "no messages"
    headers = ("ID", "HOST", "PURPOSE", "STATUS", "CREATED", "EXPIRES", "VIA", "ATTEMPTS")
    rows = [
        (
            message["id"],
            message["host_id"],
            message["purpose"],
            message["status"],
            message["created_at"],
            message["expires_at"],
            (message["delivered_via"] or {}).get("type"),
            len(message["attempts"]),
        )
        for message in messages
    ]
    return _table(headers, rows)


def _message_text(message: dict[str, Any]) -> str:
    via = message["delivered_via"]
    fields = (
        ("id", message["id"]),
        ("host", message["host_id"]),
        ("purpose", message["purpose"]),
        ("status", message["status"]),
        ("created", message["created_at"]),
        ("expires", message["expires_at"]),
        ("delivered", message["delivered_at"]),
        ("via", f"{via['type']} {via['connector_id']}" if via else None),
    )
    summary = "\n".join(f"{name + ':':<11}{_cell(value)}" for name, value in fields)
    attempts = message["attempts"]
    if not attempts:
        return f"{summary}\n\nno attempts yet"
    headers = ("STARTED", "FINISHED", "TYPE", "CONNECTOR", "DESTINATION", "STATUS", "ERROR", "MS", "MESSAGE")
    rows = [
        (
            attempt["started_at"],
            attempt["finished_at"],
            attempt["type"],
            attempt["connector_id"],
            attempt["destination"],
            attempt["status"],
            attempt["error_code"],
            attempt["delivery_time_ms"],
            attempt["message"],
        )
        for attempt in attempts
    ]
    return f"{summary}\n\n{_table(headers, rows)}"


def _datum(value: Any) -> str:
    # key=value pairs stay readable when a value has spaces (our error text) or is itself an object.
    if isinstance(value, dict) or (isinstance(value, str) and any(char.isspace() for char in value)):
        return _cell(json.dumps(value, separators=(",", ":")))
    return _cell(value)


def _events_text(events: list[dict[str, Any]]) -> str:
    if not events:
        return "no events"
    rows = []
    for event in events:
        data = dict(event["data"])
        host = data.pop("host_id", None)
        details = " ".join(f"{key}={_datum(value)}" for key, value in data.items() if value not in (None, ""))
        rows.append((event["id"], event["timestamp"], event["type"], host, details))
    return _table(("ID", "TIME", "TYPE", "HOST", "DATA"), rows)


_JSON = click.option("--json", "json_output", is_flag=True, help="Print JSON, as the API answers.")
_LIMIT = click.option("--limit", default=20, show_default=True, type=click.IntRange(1, MAX_ROWS))


def register_operator_commands(app: Flask) -> None:
    @app.cli.command("connectors")
    @click.argument("host_id", type=click.UUID)
    @_JSON
    def connectors(host_id: uuid.UUID, json_output: bool) -> None:
        """A Host's connectors: priority, verification and the latest attempt of each."""
        with _one_line_errors():
            shown = connectors_with_last_attempt(host_id)
            if not shown:
                _require_host(host_id)
        _echo({"host_id": str(host_id), "connectors": shown}, json_output, lambda: _connectors_text(host_id, shown))

    @app.cli.command("messages")
    @click.option("--host", "host_id", type=click.UUID, help="Only this Host's messages.")
    @click.option("--status", type=click.Choice(STATUSES), help="Only messages in this status.")
    @_LIMIT
    @_JSON
    def messages(host_id: uuid.UUID | None, status: str | None, limit: int, json_output: bool) -> None:
        """Messages, newest first, with their status and how many attempts they took (never their words)."""
        with _one_line_errors():
            if host_id:
                _require_host(host_id)
                found = list_messages(host_id, status, limit)
            else:
                found = recent_messages(status, limit)
            shown = MessageSchema(many=True).dump(views(found))
        _echo({"messages": shown}, json_output, lambda: _messages_text(shown))

    @app.cli.command("message")
    @click.argument("message_id", type=click.UUID)
    @_JSON
    def message(message_id: uuid.UUID, json_output: bool) -> None:
        """A message and every attempt, oldest first: destinations masked, never its words."""
        with _one_line_errors():
            try:
                found = get_message(message_id)
            except NotFoundError:
                raise click.ClickException(f"Message {message_id} not found") from None
            shown = MessageSchema().dump(view(found))
        _echo(shown, json_output, lambda: _message_text(shown))

    @app.cli.command("events")
    @click.option("--after", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1), help="Last id seen.")
    @click.option("--limit", default=100, show_default=True, type=click.IntRange(1, MAX_ROWS))
    @_JSON
    def events(after: int, limit: int, json_output: bool) -> None:
        """Events after an id, oldest first, as GET /api/internal/events shows them."""
        with _one_line_errors():
            shown = EventSchema(many=True).dump([as_json(event) for event in list_events(after, limit)])
        _echo({"events": shown}, json_output, lambda: _events_text(shown))
