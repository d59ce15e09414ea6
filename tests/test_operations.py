"""Health, readiness and the structured logs an operator reads."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from app.logs import JsonFormatter
from tests.conftest import USES_REDIS, create_connector
from tests.support import sibling_app


@pytest.fixture
def json_log():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_liveness_needs_no_token(client):
    response = client.get("/api/health")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


@pytest.mark.usefixtures("worker")
def test_readiness_checks_the_database_and_a_worker_on_every_queue(client):
    response = client.get("/api/health/ready")
    assert response.status_code == 200, response.get_json()
    checks = response.get_json()["checks"]
    assert checks["database"] == "ok"
    assert {checks[f"worker:{queue}"] for queue in ("email", "sms", "whatsapp", "telegram")} == {"ok"}
    assert ("redis" in checks) == USES_REDIS


def test_readiness_is_503_naming_the_queues_without_a_worker(app, tmp_path):
    lonely = sibling_app(app, tmp_path)
    response = lonely.test_client().get("/api/health/ready")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable" and body["checks"]["database"] == "ok"
    assert body["checks"]["worker:email"] == "down" and body["checks"]["worker:telegram"] == "down"


def test_each_request_logs_one_json_line_and_keeps_the_incoming_request_id(client, host, json_log):
    response = client.get("/api/connectors", headers={**host.headers, "X-Request-ID": "req-abc-123"})
    assert response.headers["X-Request-ID"] == "req-abc-123"
    generated = client.get("/api/connectors", headers={**host.headers, "X-Request-ID": "bad id; drop"}).headers[
        "X-Request-ID"
    ]
    assert generated != "bad id; drop" and len(generated) == 32

    access = [line for line in _lines(json_log) if line["logger"] == "connectors.access"]
    first = access[0]
    assert first["request_id"] == "req-abc-123" and first["host_id"] == str(host.id)
    assert (first["method"], first["route"], first["status"]) == ("GET", "/api/connectors", 200)
    assert isinstance(first["duration_ms"], float)


@pytest.mark.usefixtures("worker")
def test_the_request_id_is_carried_into_the_tasks_log_line(client, host, peers, json_log, worker):
    connector = create_connector(client, host, "email", peers=peers)
    response = client.post(
        f"/api/connectors/{connector['id']}/test",
        json={"test_destination": "survivor@example.org"},
        headers={**host.headers, "X-Request-ID": "req-task-42"},
    )
    assert response.status_code == 200
    if USES_REDIS:
        time.sleep(0.5)
        lines = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]
    else:
        lines = _lines(json_log)
    task_lines = [
        line for line in lines if line.get("logger") == "worker.tasks" and line.get("request_id") == "req-task-42"
    ]
    assert len(task_lines) == 1
    line = task_lines[0]
    assert line["connector_id"] == connector["id"] and line["queue"] == "email" and line["outcome"] == "sent"
    assert line["task_id"] and line["duration_ms"] >= 0
