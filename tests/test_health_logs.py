"""Readiness that asks no worker anything, the Swagger UI at /docs/, and processes whose every line is JSON.

Readiness reads which queues the workers last said they consume (app/health.py): a worker that stops takes its
word back at once, one killed is forgotten once its word is stale, and no request waits on a broadcast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from celery.app.control import Control
from flask.testing import FlaskClient

from app.health import FRESH_SECONDS
from tests import e2e_stack
from tests.conftest import ROOT, SECRET_VALUES, _start_worker_subprocess, config_for
from tests.e2e_stack import JWT_SECRET, KINDS, MASTER_KEY, QUEUES, new_host
from tests.support import DESTINATIONS, sibling_app

# The stack's fixtures, used by name by the test that starts the Procfile's processes.
e2e_peers, providers, stack = e2e_stack.e2e_peers, e2e_stack.providers, e2e_stack.stack

WORKERS_DOWN = {f"worker:{queue}": "down" for queue in QUEUES}


def _until(condition: Callable[[], bool], seconds: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, why()
        time.sleep(0.1)


# --- readiness ------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_readiness_asks_no_worker_anything_on_the_request_path(client, monkeypatch):
    # Every Celery remote-control call (inspect, ping) goes through Control.broadcast, which waits out its
    # timeout for replies: readiness must answer without it.
    def broadcast(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("readiness broadcast to the workers")

    monkeypatch.setattr(Control, "broadcast", broadcast)
    response = client.get("/api/health/ready")
    assert response.status_code == 200, response.get_json()
    checks = response.get_json()["checks"]
    assert {checks[f"worker:{queue}"] for queue in QUEUES} == {"ok"}


def test_a_worker_that_stops_is_down_at_once_and_one_killed_once_its_word_is_stale(app, tmp_path):
    sibling = sibling_app(app, tmp_path)  # its own broker, and its own word of which worker consumes what
    http: FlaskClient = sibling.test_client()

    def checks() -> dict[str, str]:
        return http.get("/api/health/ready").get_json()["checks"]

    assert {name: state for name, state in checks().items() if name.startswith("worker:")} == WORKERS_DOWN
    for ending in ("stop", "kill"):
        log_path = tmp_path / f"{ending}-worker.log"
        worker = _start_worker_subprocess(sibling.config["SIBLING_ENV"], log_path)
        try:
            _until(
                lambda: http.get("/api/health/ready").status_code == 200,
                60,
                lambda path=log_path: path.read_text()[-3000:],
            )
            if ending == "stop":
                worker.terminate()
                assert worker.wait(timeout=30) == 0
                # No waiting: a worker that shuts down takes back its word before it exits.
                response = http.get("/api/health/ready")
            else:
                worker.kill()
                worker.wait(timeout=10)
                _until(
                    lambda: http.get("/api/health/ready").status_code == 503,
                    FRESH_SECONDS + 20,
                    lambda: f"still ready {FRESH_SECONDS + 20:g} s after the only worker was killed",
                )
                response = http.get("/api/health/ready")
            assert response.status_code == 503
            body = response.get_json()
            assert body["status"] == "unavailable" and body["checks"]["database"] == "ok"
            assert {name: state for name, state in body["checks"].items() if name.startswith("worker:")} == WORKERS_DOWN
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)


# --- /docs/ ---------------------------------------------------------------------------------------------------


def test_the_swagger_ui_answers_with_and_without_a_trailing_slash(client):
    plain, slash = client.get("/docs"), client.get("/docs/")
    assert (plain.status_code, slash.status_code) == (200, 200)
    assert slash.data == plain.data and b"/docs/swagger-ui/" in slash.data


# --- JSON lines -----------------------------------------------------------------------------------------------


def _not_json_objects(text: str) -> list[str]:
    wrong = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            wrong.append(line)
    return wrong


def test_the_worker_and_beat_entry_point_logs_its_first_lines_and_python_warnings_as_json(tmp_path):
    # No secrets in the environment: they are generated, with a warning, while the settings are read, before
    # the app (and its logging) exists.
    env = {"PATH": os.environ["PATH"], "INSTANCE_PATH": str(tmp_path / "instance"), "APP_ENV": "development"}
    code = "import warnings, celery_app; warnings.warn('a warning of the test', UserWarning)"
    finished = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == ""
    assert _not_json_objects(finished.stdout) == []
    lines = [json.loads(line) for line in finished.stdout.splitlines() if line.strip()]
    assert any(line["logger"] == "app.config" and "generated development" in line["message"] for line in lines)
    assert any(line["logger"] == "py.warnings" and "a warning of the test" in line["message"] for line in lines)
    secrets = json.loads((tmp_path / "instance" / "secrets.json").read_text())
    assert not [value for value in secrets.values() if value in finished.stdout]


@pytest.mark.e2e
def test_every_line_web_worker_and_beat_print_is_a_json_object_without_a_secret(stack, providers):
    host = new_host()
    for kind in KINDS:
        connector = stack.create(host, kind, config_for(kind, providers))
        assert stack.send_test(host, connector["id"], DESTINATIONS[kind]).status_code == 200
    assert stack.request("GET", "/api/health/ready").status_code == 200
    docs = stack.request("GET", "/docs/")
    assert docs.status_code == 200 and docs.text == stack.request("GET", "/docs").text
    assert stack.request("GET", "/no-such-page").status_code == 404
    stack.stop_all()  # what they print while shutting down counts too

    output: dict[str, str] = {}
    for process in ("web", "worker", "beat"):
        for stream in ("stdout", "stderr"):
            path: Path = stack.logs / f"{process}.{stream}"
            output[f"{process}.{stream}"] = path.read_text(errors="replace") if path.exists() else ""
    plain = {name: _not_json_objects(text)[:5] for name, text in output.items() if _not_json_objects(text)}
    assert plain == {}, "lines that are not JSON objects"

    def logged(process: str) -> list[dict]:
        return [json.loads(line) for line in output[f"{process}.stdout"].splitlines() if line.strip()]

    assert any(line["logger"] == "gunicorn.error" and "Booting worker" in line["message"] for line in logged("web"))
    assert any(line["message"].endswith(" ready.") for line in logged("worker"))
    assert any("Warm shutdown" in line["message"] for line in logged("worker")), "Celery's own print, relayed"
    assert any(line["logger"] == "celery.beat" for line in logged("beat"))

    everything = "\n".join(output.values())
    secrets = (*SECRET_VALUES, JWT_SECRET, MASTER_KEY, *stack.tokens)
    assert [secret for secret in secrets if secret in everything] == []
