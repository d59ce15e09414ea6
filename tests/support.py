"""Helpers several test modules share: sending a test, a periodic task, a sibling app, a closed port, a database id."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event
from werkzeug.test import TestResponse

from app import create_app
from app.extensions import db
from tests.conftest import TEST_REDIS_URL, USES_REDIS, Host

DESTINATIONS = {
    "email": "survivor@example.org",
    "sms": "+14155550199",
    "whatsapp": "+14155550188",
    "telegram": "123456789",
}


def send_test(
    client: FlaskClient, host: Host, connector_id: str, destination: str = "survivor@example.org"
) -> TestResponse:
    return client.post(
        f"/api/connectors/{connector_id}/test", json={"test_destination": destination}, headers=host.headers
    )


# The Redis dbs a run uses besides TEST_REDIS_URL's own, as offsets from it (modulo 16): the end-to-end stacks'
# and the sibling apps' brokers (README, "Run the tests"). Never the in-process worker's db, and two runs whose
# TEST_REDIS_URL dbs are 1 to 3 apart share (and flush) none of each other's.
E2E_REDIS_DB_OFFSET, SIBLING_REDIS_DB_OFFSET = 7, 11


def shifted_redis_url(url: str, offset: int) -> str:
    parts = urlsplit(url)
    db = (int(parts.path.strip("/") or "0") + offset) % 16
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def sibling_app(app: Flask, tmp_path: Path, **env: str) -> Flask:
    """An app on the same database with its own broker (another folder, or another Redis db)."""
    sibling_env = {
        **os.environ,
        "INSTANCE_PATH": str(tmp_path),
        "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
        **env,
    }
    if USES_REDIS and "REDIS_URL" not in env:
        sibling_env["REDIS_URL"] = shifted_redis_url(TEST_REDIS_URL, SIBLING_REDIS_DB_OFFSET)
    sibling = create_app(env=sibling_env)
    sibling.config["SIBLING_ENV"] = sibling_env
    return sibling


@dataclass
class DatabaseWork:
    """What this thread sent to the database: each statement with whether it ran in autocommit, and whether
    each connection it handed back to the pool was left in autocommit."""

    statements: list[tuple[str, bool]] = field(default_factory=list)
    checked_in: list[bool] = field(default_factory=list)


@contextmanager
def database_work(app: Flask) -> Iterator[DatabaseWork]:
    """Record the database work of this thread only: the test client answers in it, while an embedded worker
    shares the engine from its own threads."""
    with app.app_context():
        engine = db.engine
    autocommit = engine.dialect.detect_autocommit_setting
    this_thread = threading.get_ident()
    work = DatabaseWork()

    def on_execute(conn, _cursor, statement, _params, _context, _many):  # type: ignore[no-untyped-def]
        if threading.get_ident() == this_thread:
            work.statements.append((statement, autocommit(conn.connection.dbapi_connection)))

    def on_checkin(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        if threading.get_ident() == this_thread:
            work.checked_in.append(autocommit(dbapi_connection))

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "checkin", on_checkin)
    try:
        yield work
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "checkin", on_checkin)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def db_id(app: Flask, connector_id: str) -> object:
    # SQLAlchemy's Uuid is a native uuid on PostgreSQL and 32 hex characters on SQLite.
    value = uuid.UUID(connector_id)
    return value if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql") else value.hex


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A redis-server of the test's own on `port`, without persistence; returns once it accepts connections."""
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def wait_for_worker(flask_app: Flask, process: subprocess.Popen, log_path: Path, seconds: float = 60) -> None:
    """Return once a worker answers a ping on `flask_app`'s broker; fail with the log tail if it died first."""
    deadline = time.monotonic() + seconds
    while not flask_app.extensions["celery"].control.ping(timeout=0.5):
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]


def run_periodic(app: Flask, task: str) -> Any:
    """What Celery beat runs on its schedule (the sweep, the check scheduling), through the worker."""
    return app.extensions["celery"].signature(task, queue="dispatch").apply_async().get(timeout=20)


def attempt_statuses(http: FlaskClient, host: Host, connector_id: str) -> list[str]:
    """The statuses of the connector's attempt log, newest first, read through the API."""
    answer = http.get(f"/api/connectors/{connector_id}/deliveries", headers=host.headers).get_json()
    return [attempt["status"] for attempt in answer["deliveries"]]
