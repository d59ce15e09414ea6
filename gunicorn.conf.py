"""gunicorn's settings for the web process (read by gunicorn from the working directory).

Every value can still be overridden on the command line; the Procfile gives none.
"""

import logging
import os
import sys

from app.boot import check_or_exit


def _whole(name: str, default: int, high: int) -> int:
    """A setting of gunicorn's, or one line naming it and exit 1, as the app's own settings do."""
    raw = os.environ.get(name) or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        print(f"connectors: {name} must be a whole number from 1 to {high}, not {raw!r}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    return int(raw)


bind = f"0.0.0.0:{_whole('PORT', 5000, 65535)}"
# Threads: a test request waits on the worker without doing anything; gevent would patch the database,
# Redis and TLS libraries under us (BENCHMARKS.md has the numbers).
worker_class = "gthread"
# The embedded default counts rate limits in process memory: one process, so the limits hold as written.
workers = _whole("WEB_CONCURRENCY", 2 if os.environ.get("REDIS_URL") else 1, 1024)
threads = _whole("GUNICORN_THREADS", 16, 1024)
timeout = 60
graceful_timeout = 30
control_socket_disable = True
# gunicorn answers these limits itself, in plain text; beyond the defaults the app sees the request and
# answers in JSON (a long query string is a 400, a long token a 401). README, "Limits".
limit_request_line = 8190
limit_request_field_size = 16380


# Every line gunicorn prints is a JSON object like the app's: its own loggers go through the app's formatter,
# on stdout. An invalid LOG_LEVEL is reported by on_starting, in one line; until then, INFO.
_level = os.environ.get("LOG_LEVEL", "INFO").strip().upper()
_level = _level if _level in {"DEBUG", "INFO", "WARNING", "ERROR"} else "INFO"
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "app.logs.JsonFormatter"}},
    "handlers": {
        "json": {"class": "app.logs.JsonStreamHandler", "formatter": "json", "stream": "ext://sys.stdout"},
        "none": {"class": "logging.NullHandler"},
    },
    "root": {"level": _level, "handlers": ["json"]},
    "loggers": {
        "gunicorn.error": {"level": _level, "handlers": [], "propagate": True},
        # The app logs every request itself, with its id and Host: gunicorn's access line would say it twice.
        "gunicorn.access": {"handlers": ["none"], "propagate": False},
    },
}
logging.captureWarnings(True)


def on_starting(_server: object) -> None:
    # In the master, before any worker: a bad setting or an unreachable database is one line and exit 1,
    # not workers that boot, fail and are restarted for ever.
    check_or_exit()
