"""The connectors service: `create_app` builds the Flask app, its extensions and its Celery app."""

from __future__ import annotations

import os
import select
from pathlib import Path
from typing import Any

from celery import Celery, Task
from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import Pool

from app.config import load_settings
from app.crypto import Keyring
from app.errors import register_error_handlers
from app.extensions import api, db, init_extensions, jwt
from app.logs import configure_logging, init_request_logging
from app.queues import celery_settings, redis_client_options

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def create_app(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Flask:
    env = dict(os.environ if env is None else env)
    app = Flask(__name__, instance_path=env.get("INSTANCE_PATH") or str(PROJECT_ROOT / "instance"))
    settings = load_settings(env, Path(app.instance_path))
    app.config.update(settings)
    app.config.update(
        MIGRATIONS_DIR=PROJECT_ROOT / "migrations",
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],
        JWT_TOKEN_LOCATION=["headers"],
        # extensions.OneTripRedisStorage: one round trip per limited request instead of three.
        RATELIMIT_STORAGE_URI=f"connectors+{settings['REDIS_URL']}" if settings["REDIS_URL"] else "memory://",
        RATELIMIT_STORAGE_OPTIONS=redis_client_options(settings),
        RATELIMIT_HEADERS_ENABLED=True,
        # Redis down must not take the CRUD endpoints with it: count in memory until it is back.
        RATELIMIT_IN_MEMORY_FALLBACK_ENABLED=True,
        RATELIMIT_KEY_PREFIX="connectors",
        API_TITLE="BAPBA Connectors API",
        API_VERSION="1.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
        API_SPEC_OPTIONS={
            "security": [{"bearerAuth": []}],
            "components": {
                "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
            },
        },
        CELERY=celery_settings(settings, Path(app.instance_path)),
    )
    if overrides:
        app.config.update(overrides)
    configure_logging(app.config["LOG_LEVEL"])

    Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    init_extensions(app)
    register_error_handlers(app, jwt)
    init_request_logging(app)
    app.extensions["keyring"] = Keyring(app.config["MASTER_KEY"], app.config["OLD_MASTER_KEYS"])
    celery_init_app(app)

    from app.auth.routes import blp as internal_blp
    from app.connectors.routes import blp as connectors_blp
    from app.deliveries.routes import blp as deliveries_blp
    from app.health import blp as health_blp

    for blueprint in (connectors_blp, deliveries_blp, internal_blp, health_blp):
        api.register_blueprint(blueprint)

    from app.cli import register_commands

    register_commands(app)
    return app


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the worker write while the web process reads; foreign keys make ON DELETE CASCADE work.
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()


@event.listens_for(Pool, "checkout")
def _drop_dead_connection(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """Discard a PostgreSQL connection the server has closed, without a round trip.

    An idle connection has nothing to read. When the server ends a session (restart, pg_terminate_backend,
    idle timeout) it sends its FATAL message and closes the socket, so a readable socket means a dead or
    confused connection; DisconnectionError makes the pool open a fresh one instead. This replaces
    `pool_pre_ping`, which cost a `SELECT 1` round trip on every checkout. (The rare asynchronous message
    of a live server, e.g. a parameter changed by a configuration reload, costs one reconnection.)
    """
    if not type(dbapi_connection).__module__.startswith("psycopg"):
        return
    if dbapi_connection.closed:
        raise DisconnectionError("connection closed")
    poller = select.poll()  # not select.select(), which cannot watch descriptors numbered 1024 or more
    poller.register(dbapi_connection.fileno(), select.POLLIN)
    if poller.poll(0):
        raise DisconnectionError("the server closed the connection")


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask)
    celery.config_from_object(app.config["CELERY"])
    celery.set_default()
    app.extensions["celery"] = celery
    return celery


__all__ = ["create_app", "db"]
