"""The connectors service: `create_app` builds the Flask app, its extensions and its Celery app."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any

from celery import Celery, Task
from flask import Blueprint as FlaskBlueprint
from flask import Flask
from sqlalchemy import event

from app.config import load_settings
from app.crypto import Keyring
from app.errors import register_error_handlers
from app.extensions import api, db, init_extensions, jwt
from app.health import init_consumer_registry
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
        RATELIMIT_STORAGE_URI=settings["REDIS_URL"] or "memory://",
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
        # Served from the pinned flask-swagger-ui package: /docs works offline and under a strict CSP.
        OPENAPI_SWAGGER_UI_URL="/docs/swagger-ui/",
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},
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
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "connect", _sqlite_pragmas)
    register_error_handlers(app, jwt)
    init_request_logging(app)
    app.extensions["keyring"] = Keyring(app.config["MASTER_KEY"], app.config["OLD_MASTER_KEYS"])
    celery_init_app(app)
    init_consumer_registry(app)  # what readiness reads, and the worker step that writes it

    from app.auth.routes import blp as internal_blp
    from app.connectors.routes import blp as connectors_blp
    from app.deliveries.routes import blp as deliveries_blp
    from app.events.routes import blp as events_blp
    from app.health import blp as health_blp
    from app.messages.routes import blp as messages_blp
    from app.webhooks.routes import blp as webhooks_blp

    for blueprint in (connectors_blp, deliveries_blp, internal_blp, messages_blp, events_blp, webhooks_blp, health_blp):
        api.register_blueprint(blueprint)
    swagger_assets = str(files("flask_swagger_ui") / "dist")
    app.register_blueprint(
        FlaskBlueprint("swagger_ui", __name__, static_folder=swagger_assets, static_url_path="/docs/swagger-ui")
    )
    # flask-smorest serves the UI at /docs only; /docs/ is the same page, not a 404.
    app.add_url_rule("/docs/", "swagger_ui_page", app.view_functions["api-docs.openapi_swagger_ui"])

    from app.cli import register_commands

    register_commands(app)
    return app


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the worker write while the web process reads; foreign keys make ON DELETE CASCADE work.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    # The web sends jobs by name (`app.queues`) and never loads the tasks: only `celery_app.py`, the worker's and
    # beat's entry point, includes `worker.tasks`.
    celery = Celery(app.name, task_cls=FlaskTask)
    celery.config_from_object(app.config["CELERY"])
    app.extensions["celery"] = celery
    return celery


__all__ = ["create_app", "db"]
