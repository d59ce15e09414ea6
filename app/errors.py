"""One JSON error envelope for every error: `{code, status, message, errors?, error_code?}`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, TypeVar

from flask import Flask, Response, current_app, jsonify
from flask_jwt_extended import JWTManager
from flask_smorest import Blueprint
from marshmallow import Schema, fields
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException, InternalServerError

from app.outcomes import ERROR_CODES

log = logging.getLogger(__name__)
T = TypeVar("T")

# Extra keys an `abort(...)` may add to the envelope (the 502 of a failed test delivery uses them).
EXTRA_KEYS = ("success", "error_code")
# The database cannot be reached (down, restarting, out of connections): a 503, and try again.
DATABASE_DOWN = (OperationalError, InterfaceError, PoolTimeout)
DATABASE_RETRY_AFTER = 5
# error_code values of errors that are not delivery outcomes.
DATABASE_UNAVAILABLE, BUSY, IN_PROGRESS, IDEMPOTENCY_KEY_REUSED, NO_ROUTE, LAST_CONNECTOR, CONFIRM_UNAVAILABLE = (
    "database_unavailable", "busy", "in_progress", "idempotency_key_reused", "no_route", "last_connector",
    "confirm_unavailable",
)  # fmt: skip
SERVICE_ERROR_CODES = (
    DATABASE_UNAVAILABLE, BUSY, IN_PROGRESS, IDEMPOTENCY_KEY_REUSED, NO_ROUTE, LAST_CONNECTOR, CONFIRM_UNAVAILABLE
)  # fmt: skip


class ErrorEnvelopeSchema(Schema):
    code = fields.Integer(required=True, metadata={"description": "The HTTP status code"})
    status = fields.String(required=True, metadata={"description": "The HTTP status phrase"})
    message = fields.String(required=True, metadata={"description": "What went wrong, for a person"})
    errors = fields.Dict(metadata={"description": "Per-field messages, validation errors only"})
    success = fields.Boolean(metadata={"description": "false, on a failed test or check"})
    error_code = fields.String(
        metadata={
            "description": "Why it failed, for a program (README, error codes)",
            "enum": [*ERROR_CODES, *SERVICE_ERROR_CODES],
        }
    )


# What an error status means wherever it is answered, and the error_code values it can carry on every route;
# a route names the further codes it can answer (a 409's `in_progress`, say) where it declares the status.
STATUS_MEANINGS = {
    400: "The request is malformed: `errors` names each field",
    401: "No valid bearer token",
    403: "The token is not a service token",
    404: "Not found (another Host's connector is as unknown as a missing one)",
    409: "Conflicts with the current state",
    413: "The body is larger than MAX_BODY_BYTES",
    422: "Valid, but cannot be done",
    429: "A rate limit was hit; Retry-After says when to try again",
    502: "The provider or the worker failed: `error_code` says why",
    503: "Unavailable for now; Retry-After says when to try again",
}
ALWAYS = {503: (DATABASE_UNAVAILABLE,)}


def documents_errors(
    blp: Blueprint, *statuses: int, error_codes: dict[int, tuple[str, ...]] | None = None
) -> Callable[[Callable], Callable]:
    """Declare the error statuses a view can answer in /openapi.json: the envelope schema, what the status means,
    and the `error_code` values it can carry."""
    error_codes = error_codes or {}

    def decorator(view: Callable) -> Callable:
        for status in statuses:
            codes = (*ALWAYS.get(status, ()), *error_codes.get(status, ()))
            description = STATUS_MEANINGS.get(status, HTTPStatus(status).phrase)
            if codes:
                description += ". `error_code`: " + ", ".join(f"`{code}`" for code in codes)
            view = blp.alt_response(status, schema=ErrorEnvelopeSchema, description=description)(view)
        return view

    return decorator


class ServiceError(Exception):
    """Raised by services; becomes the JSON envelope with `status_code`."""

    status_code = 400
    error_code: str | None = None
    retry_after: int | None = None

    def __init__(self, message: str, errors: dict[str, Any] | None = None, error_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors
        self.error_code = error_code or self.error_code


class InvalidError(ServiceError):
    status_code = 400


class NotFoundError(ServiceError):
    status_code = 404


class ConflictError(ServiceError):
    status_code = 409


class UnprocessableError(ServiceError):
    status_code = 422


class BusyError(ServiceError):
    """This process already waits on as many tests as it may: the caller should come back shortly."""

    status_code = 503
    error_code = BUSY
    retry_after = 5


def error_response(code: int, message: str | None = None, **extra: Any) -> Response:
    status = HTTPStatus(code)
    payload: dict[str, Any] = {"code": code, "status": status.phrase, "message": message or status.description}
    errors = extra.pop("errors", None)
    if errors:
        payload["errors"] = errors
    payload.update({key: value for key, value in extra.items() if value is not None})
    response = jsonify(payload)
    response.status_code = code
    return response


def _message(error: HTTPException, data: dict[str, Any]) -> str:
    if data.get("message"):
        return data["message"]
    if error.code == 400 and (data.get("messages") or data.get("errors")):
        return "Validation failed: see errors"
    if error.code == 429:
        limit = getattr(error, "limit", None)
        what = f" of {limit.limit}" if limit is not None else ""
        return f"Rate limit{what} exceeded for this endpoint; retry after the time in Retry-After (seconds)"
    return error.description or HTTPStatus(error.code or 500).description


def handle_http_exception(error: HTTPException) -> Response:
    data = getattr(error, "data", None) or {}
    extra = {key: data[key] for key in EXTRA_KEYS if key in data}
    errors = data.get("messages") or data.get("errors")
    response = error_response(error.code or 500, _message(error, data), errors=errors, **extra)
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    for name, value in (data.get("headers") or {}).items():
        response.headers[name] = value
    return response


def handle_service_error(error: ServiceError) -> Response:
    response = error_response(error.status_code, error.message, errors=error.errors, error_code=error.error_code)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def discard_session() -> None:
    """Drop the request's database session after the database failed under it; never raises."""
    session = current_app.extensions["sqlalchemy"].session
    try:
        session.remove()
    except Exception as exc:  # the rollback on a dead connection fails too; the pool replaces it
        log.warning("discarded a database session: %s", type(exc).__name__)
        session.registry.clear()


def with_database_retry(what: str, call: Callable[[], T], seconds: float) -> T:
    """`call()`, tried again while the database cannot be reached, for up to `seconds`; each failure logged."""
    give_up = time.monotonic() + seconds
    pause = 0.2
    while True:
        try:
            return call()
        except DATABASE_DOWN as exc:
            discard_session()
            if time.monotonic() + pause > give_up:
                raise
            log.warning("%s: the database is unavailable (%s), trying again in %.1f s", what, type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def handle_database_down(error: Exception) -> Response:
    log.error("database unavailable: %s", type(error).__name__, exc_info=error)
    discard_session()
    response = error_response(503, "The database is unavailable; try again shortly", error_code=DATABASE_UNAVAILABLE)
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
    return response


def handle_unexpected(error: Exception) -> Response:
    log.error("unhandled error: %s", type(error).__name__, exc_info=error)
    return error_response(500, InternalServerError.description)


def register_error_handlers(app: Flask, jwt: JWTManager) -> None:
    # HTTP errors (abort, 404, 405, 413, webargs' 400) are answered by the Api's `handle_http_exception`.
    app.register_error_handler(ServiceError, handle_service_error)
    for error in DATABASE_DOWN:
        app.register_error_handler(error, handle_database_down)
    app.register_error_handler(Exception, handle_unexpected)

    # A database that went away during the request must not turn its answer (perhaps a committed success)
    # into an error page when the session's rollback fails at teardown. Teardowns run in reverse order of
    # registration, so this one runs before Flask-SQLAlchemy's own `session.remove()`, which then has
    # nothing left to do.
    app.teardown_appcontext(lambda _exc: discard_session())

    # flask-jwt-extended answers 422 for some bad tokens; every bad token is a 401 here.
    def unauthorized(reason: str) -> Response:
        response = error_response(401, reason)
        response.headers["WWW-Authenticate"] = 'Bearer realm="connectors"'
        return response

    jwt.unauthorized_loader(lambda reason: unauthorized(f"Missing or malformed bearer token: {reason}"))
    jwt.invalid_token_loader(lambda reason: unauthorized(f"Invalid token: {reason}"))
    jwt.expired_token_loader(lambda _header, _data: unauthorized("Token has expired"))
    jwt.revoked_token_loader(lambda _header, _data: unauthorized("Token has been revoked"))
    jwt.needs_fresh_token_loader(lambda _header, _data: unauthorized("Fresh token required"))
    jwt.token_verification_failed_loader(lambda _header, _data: unauthorized("Token claims are not valid"))
    jwt.user_lookup_error_loader(lambda _header, _data: unauthorized("Unknown token subject"))
