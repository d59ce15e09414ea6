"""Structured JSON logs: one line per request and per task, with the request id carried across."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, request

from app.redact import redact

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# Libraries that log request URLs or bodies at INFO/DEBUG; a Telegram URL carries the bot token.
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "telegram", "twilio", "hpack", "asyncio", "sqlalchemy.engine")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
            # A field of the line, never raw lines on stderr, and scrubbed like the message: it can quote secrets.
            entry["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def incoming_request_id(value: str | None) -> str:
    return value if value and REQUEST_ID.fullmatch(value) else uuid.uuid4().hex


def init_request_logging(app: Flask) -> None:
    access = logging.getLogger("connectors.access")

    @app.before_request
    def start() -> None:
        g.started = time.perf_counter()
        g.request_id = incoming_request_id(request.headers.get("X-Request-ID"))
        request_id_var.set(g.request_id)

    @app.teardown_request
    def forget_request_id(_error: BaseException | None) -> None:
        request_id_var.set(None)  # lines logged outside a request must not carry a stale id

    @app.after_request
    def finish(response: Response) -> Response:
        request_id = g.get("request_id") or incoming_request_id(None)
        response.headers["X-Request-ID"] = request_id
        host_id = g.get("host_id")
        access.info(
            "%s %s %s",
            request.method,
            request.url_rule.rule if request.url_rule else request.path,
            response.status_code,
            extra={
                "fields": {
                    "request_id": request_id,
                    "host_id": str(host_id) if host_id else None,
                    "method": request.method,
                    "route": request.url_rule.rule if request.url_rule else None,
                    "status": response.status_code,
                    "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 2),
                }
            },
        )
        return response
