"""The Celery floor of figures 2, 3 and 6: Celery alone, configured as the service is, running tasks that take
the service's task arguments and return its result, but do nothing else (`floor.noop`, for figure 2's round
trip) or only wait for the provider's 100 ms (`floor.sleep`, for figure 3's throughput); and, for figure 6,
dispatch's two hops with nothing of ours in them: `floor.dispatch` on the dispatch queue only queues
`floor.send` on the telegram queue, which makes the same Bot API call to the same peer with a plain httpx
client. Neither keeps a result (the figure reads the peer's receipts).

Its worker is the Procfile's worker command with `-A celery_app` replaced by `-A bench.celery_floor`, on a
Redis database of its own (REDIS_URL), so that it never takes the service's jobs.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from celery import Celery

from bench.stack import celery_config

PROVIDER_SECONDS = 0.1
OUTCOME = {"success": True, "message": "Test message sent successfully", "delivery_time_ms": 0, "error_code": None}
TELEGRAM_QUEUE = "telegram"


def floor_celery(env: Mapping[str, str]) -> Celery:
    """Celery as the service configures it from `env` (REDIS_URL naming the floor's own database)."""
    config = celery_config(dict(env), Path(tempfile.gettempdir()))
    config["include"] = []
    config["beat_schedule"] = {}
    celery = Celery("celery-floor", set_as_current=False)
    celery.config_from_object(config)
    return celery


# The floor's worker process is started with BENCH_FLOOR_WORKER=1 and the stack's environment; anywhere else
# (the benchmark's own process imports this module for its names) the app is an unconfigured placeholder.
if os.environ.get("BENCH_FLOOR_WORKER") == "1":
    app = floor_celery(os.environ)
else:
    app = Celery("celery-floor", set_as_current=False)
_http = threading.local()


@app.task(name="floor.noop")
def noop(attempt_id: str, destination: str, request_id: str | None = None, deadline: float | None = None) -> Any:
    return OUTCOME


@app.task(name="floor.sleep")
def sleep(attempt_id: str, destination: str, request_id: str | None = None, deadline: float | None = None) -> Any:
    time.sleep(PROVIDER_SECONDS)
    return OUTCOME


@app.task(name="floor.dispatch", ignore_result=True)
def dispatch(message_id: str, connector_id: str, round_: int, base_url: str, token: str, chat: str, text: str) -> None:
    app.send_task("floor.send", args=[message_id, connector_id, round_, base_url, token, chat, text],
                  queue=TELEGRAM_QUEUE)  # fmt: skip


@app.task(name="floor.send", ignore_result=True)
def send(message_id: str, connector_id: str, round_: int, base_url: str, token: str, chat: str, text: str) -> None:
    client = getattr(_http, "client", None)
    if client is None:
        client = _http.client = httpx.Client(timeout=10)
    client.post(f"{base_url}/bot{token}/sendMessage", json={"chat_id": chat, "text": text}).raise_for_status()
