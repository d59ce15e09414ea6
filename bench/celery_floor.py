"""The Celery floor of figures 2 and 3: Celery alone, configured as the service is, running tasks that take
the service's task arguments and return its result, but do nothing else (`floor.noop`, for figure 2's round
trip) or only wait for the provider's 100 ms (`floor.sleep`, for figure 3's throughput).

Its worker is the Procfile's worker command with `-A celery_app` replaced by `-A bench.celery_floor`, on a
Redis database of its own (REDIS_URL), so that it never takes the service's jobs.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from celery import Celery

from app.queues import celery_settings

PROVIDER_SECONDS = 0.1
OUTCOME = {"success": True, "message": "Test message sent successfully", "delivery_time_ms": 0, "error_code": None}


def floor_celery(redis_url: str) -> Celery:
    settings = {"REDIS_URL": redis_url, "REDIS_SSL_CERT_REQS": "required"}
    config = celery_settings(settings, Path(tempfile.gettempdir()))
    config["include"] = []
    celery = Celery("celery-floor", set_as_current=False)
    celery.config_from_object(config)
    return celery


app = floor_celery(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/7"))


@app.task(name="floor.noop")
def noop(attempt_id: str, destination: str, request_id: str | None = None, deadline: float | None = None) -> Any:
    return OUTCOME


@app.task(name="floor.sleep")
def sleep(attempt_id: str, destination: str, request_id: str | None = None, deadline: float | None = None) -> Any:
    time.sleep(PROVIDER_SECONDS)
    return OUTCOME
