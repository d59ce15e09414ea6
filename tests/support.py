"""Helpers several test modules share: sending a test, a sibling app, a closed port, a database id."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app import create_app
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


def sibling_app(app: Flask, tmp_path: Path, **env: str) -> Flask:
    """An app on the same database with its own broker (another folder, or another Redis db)."""
    sibling_env = {
        **os.environ,
        "INSTANCE_PATH": str(tmp_path),
        "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
        **env,
    }
    if USES_REDIS and "REDIS_URL" not in env:
        sibling_env["REDIS_URL"] = TEST_REDIS_URL.rsplit("/", 1)[0] + "/9"
    sibling = create_app(env=sibling_env)
    sibling.config["SIBLING_ENV"] = sibling_env
    return sibling


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def db_id(app: Flask, connector_id: str) -> object:
    # SQLAlchemy's Uuid is a native uuid on PostgreSQL and 32 hex characters on SQLite.
    value = uuid.UUID(connector_id)
    return value if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql") else value.hex
