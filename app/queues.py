"""Celery settings, queues and the names of every job: Redis when REDIS_URL is set, otherwise an embedded
transport that needs no server.

The web and beat send jobs by these names and never import the tasks; `worker/tasks.py` defines a task for each.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any

from celery import Celery
from flask import current_app
from kombu import Exchange, Queue
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps, loads

from app.channels import CHANNELS


class _AtomicChannel(filesystem.Channel):
    """kombu's filesystem channel, made safe for several processes.

    Upstream writes a message file in place, so a polling worker can read it half-written, and moves taken
    files to the system temp folder, which is a copy (not an atomic rename) across file systems. Here a
    message appears only once complete (write, then rename), and a consumer takes it by renaming it
    within the broker folder: exactly one consumer wins.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{time.monotonic_ns() // 1_000_000:015d}_{uuid.uuid4()}.{queue}.msg"
        staging = os.path.join(self.data_folder_out, f".{name}.tmp")
        with open(staging, "wb") as handle:
            handle.write(dumps(payload).encode())
        os.replace(staging, os.path.join(self.data_folder_out, name))

    def _get(self, queue: str) -> Any:
        suffix = f".{queue}.msg"
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.startswith(".") or not name.endswith(suffix):
                continue
            taken = os.path.join(self.processed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), taken)
            except OSError:
                continue  # another consumer took it
            with open(taken, "rb") as handle:
                payload = handle.read()
            os.remove(taken)
            return loads(payload.decode())
        raise Empty()


class EmbeddedFilesystemTransport(filesystem.Transport):
    Channel = _AtomicChannel


TRANSPORT_ALIASES["embeddedfs"] = f"{__name__}:EmbeddedFilesystemTransport"

# Fail fast when Redis is down: the caller is waiting on an HTTP request.
FAIL_FAST = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

# Each connector type's sends and checks run on the type's own queue, so a slow provider holds up only its
# own kind; deciding what a message does next, and the periodic sweep, run on this one.
DISPATCH_QUEUE = "dispatch"
# One-time codes' jobs (deciding and sending): apart, so that they never wait behind a flood of notifications.
OTP_QUEUE = "otp"

# Every job, by name. Tests and checks run on the connector type's queue; the rest on `dispatch`.
SEND_TEST = "deliveries.send_test"
CHECK_CONNECTOR = "deliveries.check"
ADVANCE_MESSAGE = "dispatch.advance"
SEND_MESSAGE = "dispatch.send"
DELIVER_EVENTS = "events.deliver"
SWEEP = "dispatch.sweep"
CHECK_SCHEDULE = "checks.schedule"

# A burst of changes asks for one events delivery now and one at the end of this window, not one each: a
# delivery takes every event that is due when it runs.
COALESCE_SECONDS = 0.25

log = logging.getLogger(__name__)


def queue_names() -> list[str]:
    return [OTP_QUEUE, *(kind.queue for kind in CHANNELS.values()), DISPATCH_QUEUE]


def _send(celery: Celery, task_name: str, args: tuple[Any, ...], queue: str, countdown: float | None = None) -> bool:
    try:
        celery.send_task(task_name, args=args, queue=queue, countdown=countdown)
        return True
    except Exception as exc:  # kombu raises several types when the broker is down
        log.warning("could not queue %s: %s; the sweep will pick it up", task_name, type(exc).__name__)
        return False


def nudge(task_name: str, *args: Any, queue: str = DISPATCH_QUEUE, countdown: float | None = None) -> bool:
    """Queue a job that only speeds up what the database already says must happen (the sweep would find it
    later), now or in `countdown` seconds; False, logged, when the broker cannot take it."""
    return _send(current_app.extensions["celery"], task_name, args, queue, countdown)


_coalesce_lock = threading.Lock()
_last_nudged: dict[str, float] = {}
_trailing: set[str] = set()


def nudge_coalesced(task_name: str) -> None:
    """`nudge` for a job without arguments that does all there is to do when it runs: at most one per
    COALESCE_SECONDS in this process, and one more at the end of the window for what came during it."""
    celery = current_app.extensions["celery"]
    with _coalesce_lock:
        if task_name in _trailing:  # one is already due at the end of the window: it will see this change
            return
        wait = _last_nudged.get(task_name, float("-inf")) + COALESCE_SECONDS - time.monotonic()
        if wait > 0:
            _trailing.add(task_name)
            timer = threading.Timer(wait, _trailing_nudge, args=(celery, task_name))
            timer.daemon = True
            timer.start()
            return
        _last_nudged[task_name] = time.monotonic()
    _send(celery, task_name, (), DISPATCH_QUEUE)


def _trailing_nudge(celery: Celery, task_name: str) -> None:
    with _coalesce_lock:
        _trailing.discard(task_name)
        _last_nudged[task_name] = time.monotonic()
    _send(celery, task_name, (), DISPATCH_QUEUE)


CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def redis_client_options(settings: dict[str, Any]) -> dict[str, Any]:
    """Options every Redis client of the service needs: the TLS check for `rediss://` URLs."""
    if (settings["REDIS_URL"] or "").startswith("rediss://"):
        return {"ssl_cert_reqs": CERT_REQS[settings["REDIS_SSL_CERT_REQS"]]}
    return {}


def celery_settings(settings: dict[str, Any], instance_path: Path) -> dict[str, Any]:
    common: dict[str, Any] = {
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in queue_names()],
        "task_default_queue": DISPATCH_QUEUE,
        "beat_schedule": {
            "sweep": {"task": SWEEP, "schedule": settings["SWEEP_INTERVAL"], "options": {"expires": 60}},
            # Often enough that checks due over the interval go out evenly, not in a burst per tick.
            "checks": {
                "task": CHECK_SCHEDULE,
                "schedule": min(60.0, max(0.5, settings["CONNECTOR_CHECK_INTERVAL"] / 100)),
                "options": {"expires": 60},
            },
        },
        "beat_schedule_filename": str(instance_path / "celerybeat-schedule"),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": 3600,
        "result_extended": False,
        "task_acks_late": False,  # a test message is never worth sending twice
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "broker_connection_retry_on_startup": True,
        "task_publish_retry_policy": FAIL_FAST,
    }
    redis_url = settings["REDIS_URL"]
    if redis_url:
        timeouts = {"socket_connect_timeout": 3, "socket_timeout": 10, "health_check_interval": 10}
        common.update(
            # Redis answering OOM or READONLY (after a failover) raises kombu *channel* errors, which a worker
            # otherwise treats as fatal and exits on: retry them like a lost connection, for ever.
            broker_channel_error_retry=True,
            broker_connection_max_retries=None,
            broker_url=redis_url,
            result_backend=redis_url,
            broker_transport_options={**timeouts, **FAIL_FAST},
            # Celery's default retries a lost result store for ~20 s; a waiting HTTP request cannot.
            result_backend_transport_options={"retry_policy": FAIL_FAST},
            redis_socket_connect_timeout=3,
            redis_socket_timeout=10,
            redis_backend_health_check_interval=10,
        )
        if redis_url.startswith("rediss://"):
            tls = redis_client_options(settings)
            common.update(broker_use_ssl=tls, redis_backend_use_ssl=tls)
        return common

    broker = instance_path / "broker"
    for folder in ("queue", "control", "processed"):
        (broker / folder).mkdir(parents=True, exist_ok=True)
    common.update(
        broker_url="embeddedfs://localhost/",
        broker_transport_options={
            "data_folder_in": str(broker / "queue"),
            "data_folder_out": str(broker / "queue"),
            "control_folder": str(broker / "control"),
            "processed_folder": str(broker / "processed"),
            "polling_interval": 0.01,
        },
        result_backend=f"db+sqlite:///{instance_path / 'celery-results.sqlite3'}",
    )
    return common
