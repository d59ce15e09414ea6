"""Celery settings: Redis when REDIS_URL is set, otherwise an embedded transport that needs no server."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from kombu import Queue

from app.connectors.models import CONNECTOR_TYPES

CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def celery_settings(settings: dict[str, Any], instance_path: Path) -> dict[str, Any]:
    common: dict[str, Any] = {
        "include": ["worker.tasks"],
        "task_queues": [Queue(name, routing_key=name) for name in CONNECTOR_TYPES],
        "task_default_queue": CONNECTOR_TYPES[0],
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
        # Fail fast when the broker is down: the caller is waiting on an HTTP request.
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    }
    redis_url = settings["REDIS_URL"]
    if redis_url:
        timeouts = {"socket_connect_timeout": 3, "socket_timeout": 10, "health_check_interval": 10}
        common.update(
            broker_url=redis_url,
            result_backend=redis_url,
            broker_transport_options={**timeouts, "retry_on_timeout": True},
            redis_socket_connect_timeout=3,
            redis_socket_timeout=10,
            redis_backend_health_check_interval=10,
        )
        if redis_url.startswith("rediss://"):
            tls = {"ssl_cert_reqs": CERT_REQS[settings["REDIS_SSL_CERT_REQS"]]}
            common.update(broker_use_ssl=tls, redis_backend_use_ssl=tls)
        return common

    broker = instance_path / "broker"
    for folder in ("queue", "control", "processed"):
        (broker / folder).mkdir(parents=True, exist_ok=True)
    common.update(
        broker_url="filesystem://localhost/",
        broker_transport_options={
            "data_folder_in": str(broker / "queue"),
            "data_folder_out": str(broker / "queue"),
            "control_folder": str(broker / "control"),
            "processed_folder": str(broker / "processed"),
            "store_processed": False,
            "polling_interval": 0.01,
        },
        result_backend=f"db+sqlite:///{instance_path / 'celery-results.sqlite3'}",
    )
    return common
