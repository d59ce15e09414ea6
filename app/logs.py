"""Structured JSON logs: one line per request and per task, with the request id carried across."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from celery.signals import beat_init, celeryd_init, setup_logging
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


class JsonStreamHandler(logging.StreamHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        # logging reports a failed write on stderr; from a thread relaying stderr (see _relay_stray_output),
        # that report would come back to this handler, fail again, and so on for ever.
        if threading.current_thread() not in _relaying:
            super().handleError(record)


def configure_logging(level: str | int | None = None) -> None:
    """One JSON handler on the root logger, on stdout; Python's warnings go through it too. Without `level`,
    the root logger's level is left as it is (for lines logged before the settings are read)."""
    root = logging.getLogger()
    if not any(isinstance(handler.formatter, JsonFormatter) for handler in root.handlers):
        handler = JsonStreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    logging.captureWarnings(True)
    if level is not None:
        root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@setup_logging.connect
def _celery_logging(loglevel: int | None = None, **_options: Any) -> None:
    # A receiver of this signal tells the worker and beat that logging is configured: Celery then adds none
    # of its plain-text handlers. `--loglevel` still sets the level.
    configure_logging(loglevel)


def configure_celery_process_logging() -> None:
    """For the worker's and beat's entry point: JSON from the first line (reading the settings may log), and,
    once the worker or beat starts, what they write past logging made JSON too."""
    configure_logging()
    celeryd_init.connect(_relay_stray_output, weak=False)
    beat_init.connect(_relay_stray_output, weak=False)


_relaying: list[threading.Thread] = []


def _relay_stray_output(**_signal: Any) -> None:
    """Make every line written straight to this process's stdout or stderr a JSON log line.

    Celery's worker writes "worker: Warm shutdown (MainProcess)" with os.write on file descriptor 1 from its
    SIGTERM handler, with no setting to turn it off (celery/celery#8101); anything else that prints (a
    library, the interpreter's last words) would be plain text too. Descriptors 1 and 2 become pipes, read
    by threads that log each line; the JSON handler writes to a copy of the original stdout.
    """
    if _relaying:
        return
    handler = next(h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter))
    sys.stdout.flush()
    sys.stderr.flush()
    originals = {fd: os.dup(fd) for fd in (1, 2)}
    handler.setStream(os.fdopen(os.dup(originals[1]), "w", encoding="utf-8", errors="replace", buffering=1))
    for fd, level in ((1, logging.INFO), (2, logging.WARNING)):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        thread = threading.Thread(target=_relay, args=(read_end, fd, level), name=f"relay-fd{fd}", daemon=True)
        thread.start()
        _relaying.append(thread)
    atexit.register(_stop_relaying, originals)


def _relay(read_end: int, fd: int, level: int) -> None:
    logger = logging.getLogger("connectors.stdout" if fd == 1 else "connectors.stderr")
    with os.fdopen(read_end, encoding="utf-8", errors="replace") as pipe:
        for line in pipe:
            if line.strip():
                logger.log(level, "%s", line.rstrip("\n"))


def _stop_relaying(originals: dict[int, int]) -> None:
    # Closing the pipes' last write ends lets the threads log what is left and end; what the interpreter
    # writes after this goes where it would have gone, as it is.
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, original in originals.items():
        os.dup2(original, fd)
    for thread in _relaying:
        thread.join(timeout=2)


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
