"""Liveness and readiness; neither needs a token."""

from __future__ import annotations

import redis
from flask import current_app
from flask.views import MethodView
from marshmallow import Schema, fields
from sqlalchemy import text

from app.extensions import Blueprint, db, limiter
from app.queues import queue_names, redis_client_options

blp = Blueprint("health", __name__, url_prefix="/api/health", description="Liveness and readiness")


class HealthSchema(Schema):
    status = fields.String(required=True)


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"description": "ok or unavailable"})
    checks = fields.Dict(keys=fields.String(), values=fields.String())


@blp.route("")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    @blp.doc(security=[])
    def get(self) -> dict:
        """Liveness: the process is up"""
        return {"status": "ok"}


def _check_database() -> str:
    try:
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
        return "ok"
    except Exception:
        db.session.rollback()
        return "down"


def _check_redis() -> str | None:
    url = current_app.config["REDIS_URL"]
    if not url:
        return None
    try:
        options = redis_client_options(current_app.config)
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1, **options).ping()
        return "ok"
    except Exception:
        return "down"


def _check_workers() -> dict[str, str]:
    celery = current_app.extensions["celery"]
    try:
        replies = celery.control.inspect(timeout=1.0).active_queues() or {}
    except Exception:
        replies = {}
    served = {queue["name"] for queues in replies.values() for queue in queues or []}
    return {f"worker:{name}": "ok" if name in served else "down" for name in queue_names()}


@blp.route("/ready")
class Ready(MethodView):
    # Each call broadcasts to the workers and waits up to a second: not something to allow in a loop.
    @limiter.limit("60 per minute")
    @blp.response(200, ReadySchema)
    @blp.alt_response(503, schema=ReadySchema, description="Something it depends on is down")
    @blp.doc(security=[])
    def get(self) -> tuple[dict, int]:
        """Readiness: the database, Redis (when configured) and a worker on every queue answer"""
        checks = {"database": _check_database()}
        redis_state = _check_redis()
        if redis_state:
            checks["redis"] = redis_state
        if checks.get("redis") != "down":
            checks.update(_check_workers())
        ready = all(state == "ok" for state in checks.values())
        return {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
