"""Extension singletons, bound to the app in `create_app`."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import flask_smorest
from flask import Flask, Request, g, has_request_context, request
from flask_jwt_extended import JWTManager, get_jwt_identity, verify_jwt_in_request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_smorest import Api, abort
from flask_sqlalchemy import SQLAlchemy
from limits.storage import RedisStorage
from sqlalchemy import Connection, MetaData
from sqlalchemy.orm import DeclarativeBase
from webargs.flaskparser import FlaskParser, is_json_request


class Base(DeclarativeBase):
    # Named constraints keep Alembic migrations identical on SQLite and PostgreSQL.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class BadRequestParser(FlaskParser):
    """The contract says validation errors are 400, not webargs' default 422."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req: Request) -> Any:
        # webargs would treat a non-JSON body as absent and report missing fields; say what is wrong.
        if not is_json_request(req):
            abort(400, message="Content-Type must be application/json")
        try:
            data = super()._raw_load_json(req)
        except RecursionError:  # deeply nested JSON within the size limit
            abort(400, message="JSON body is nested too deeply")
        try:
            # JSON may escape lone surrogates ("\udfff"); no database or provider can take them.
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            abort(400, message="JSON body contains text that is not valid Unicode")
        return data


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = BadRequestParser()


class OneTripRedisStorage(RedisStorage):
    """Redis limits storage whose hit also answers the window's stats, so a request costs one round trip.

    flask-limiter hits the limit (one script call), then reads the count and TTL back for the X-RateLimit-*
    headers (two more calls). The script below returns both with the hit; `get`/`get_expiry` answer from it
    for the rest of the same request (kept in its WSGI environ).
    URIs: `connectors+redis://` and `connectors+rediss://`.
    """

    STORAGE_SCHEME = ["connectors+redis", "connectors+rediss"]
    INCR_AND_TTL = """
        local current = redis.call("incrby", KEYS[1], ARGV[2])
        if tonumber(current) == tonumber(ARGV[2]) then redis.call("expire", KEYS[1], ARGV[1]) end
        return {current, redis.call("ttl", KEYS[1])}
    """
    WINDOWS = "connectors.limit_windows"  # in the WSGI environ: one request's, never another's

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.removeprefix("connectors+"), **options)

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self.lua_incr_and_ttl = self.get_connection().register_script(self.INCR_AND_TTL)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        count, ttl = self.lua_incr_and_ttl([self.prefixed_key(key)], [expiry, amount])
        if has_request_context():
            request.environ.setdefault(self.WINDOWS, {})[key] = (int(count), max(int(ttl), 0) + time.time())
        return int(count)

    def _seen(self, key: str) -> tuple[int, float] | None:
        return request.environ.get(self.WINDOWS, {}).get(key) if has_request_context() else None

    def get(self, key: str) -> int:
        seen = self._seen(key)
        return seen[0] if seen else super().get(key)

    def get_expiry(self, key: str) -> float:
        seen = self._seen(key)
        return seen[1] if seen else super().get_expiry(key)


def rate_limit_key() -> str:
    """Limits count per Host; a request without a valid token counts against its address."""
    claims = g.get("jwt_claims")  # verified by the view's auth check, which runs first
    if claims is not None:
        identity = claims.get("sub")
    else:
        try:
            verify_jwt_in_request(optional=True)
            identity = get_jwt_identity()
        except Exception:  # the view itself answers 401 for a bad token
            identity = None
    return f"host:{identity}" if identity else f"addr:{get_remote_address()}"


db = SQLAlchemy(model_class=Base)
api = Api()
jwt = JWTManager()
limiter = Limiter(key_func=rate_limit_key)


def autocommit() -> Connection:
    """A pooled connection without a transaction, for work that is one statement at a time: no BEGIN and
    COMMIT (or ROLLBACK) round trips around it. Use as a context manager."""
    return db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def init_extensions(app: Flask) -> None:
    db.init_app(app)
    jwt.init_app(app)
    limiter.init_app(app)
    api.init_app(app)


def init_migrations(app: Flask) -> None:
    """Flask-Migrate, set up only where migrations run (`flask db ...`, the tests).

    It imports Alembic, Mako and Pygments: about 10 MiB in every web and worker process, which never migrate.
    """
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at import
    from flask_migrate import Migrate

    if "migrate" not in app.extensions:
        Migrate(app, db, directory=str(app.config["MIGRATIONS_DIR"]), compare_type=True)
