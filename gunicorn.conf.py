"""gunicorn's settings for the web process (read by gunicorn from the working directory).

Every value can still be overridden on the command line; the Procfile gives none.
"""

import os

from app.boot import check_or_exit

bind = f"0.0.0.0:{os.environ.get('PORT', '5000')}"
# Threads: a test request waits on the worker without doing anything; gevent would patch the database,
# Redis and TLS libraries under us (BENCHMARKS.md has the numbers).
worker_class = "gthread"
# The embedded default counts rate limits in process memory: one process, so the limits hold as written.
workers = int(os.environ.get("WEB_CONCURRENCY") or (2 if os.environ.get("REDIS_URL") else 1))
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
timeout = 60
graceful_timeout = 30
control_socket_disable = True
# gunicorn answers these limits itself, in plain text; beyond the defaults the app sees the request and
# answers in JSON (a long query string is a 400, a long token a 401). README, "Limits".
limit_request_line = 8190
limit_request_field_size = 16380


def on_starting(_server: object) -> None:
    # In the master, before any worker: a bad setting or an unreachable database is one line and exit 1,
    # not workers that boot, fail and are restarted for ever.
    check_or_exit()
