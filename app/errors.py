"""One JSON error envelope for every error: `{code, status, message, errors?}`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, jsonify
from flask_jwt_extended import JWTManager
from flask_smorest import Blueprint
from marshmallow import Schema, fields
from werkzeug.exceptions import HTTPException, InternalServerError

log = logging.getLogger(__name__)

# Extra keys an `abort(...)` may add to the envelope (the 502 of a failed test delivery uses them).
EXTRA_KEYS = ("success", "error_code")


class ErrorEnvelopeSchema(Schema):
    code = fields.Integer(required=True)
    status = fields.String(required=True)
    message = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "Per-field messages, validation errors only"})
    success = fields.Boolean(metadata={"description": "false, on a failed test delivery"})
    error_code = fields.String(metadata={"description": "Why a test delivery failed (README)"})


def documents_errors(blp: Blueprint, *codes: int) -> Callable[[Callable], Callable]:
    """Declare the error statuses a view can answer, with the envelope schema, in /openapi.json."""

    def decorator(view: Callable) -> Callable:
        for code in codes:
            view = blp.alt_response(code, schema=ErrorEnvelopeSchema, description=HTTPStatus(code).phrase)(view)
        return view

    return decorator


class ServiceError(Exception):
    """Raised by services; becomes the JSON envelope with `status_code`."""

    status_code = 400

    def __init__(self, message: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors


class InvalidError(ServiceError):
    status_code = 400


class NotFoundError(ServiceError):
    status_code = 404


class ConflictError(ServiceError):
    status_code = 409


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


def handle_http_exception(error: HTTPException) -> Response:
    data = getattr(error, "data", None) or {}
    message = data.get("message") or error.description
    extra = {key: data[key] for key in EXTRA_KEYS if key in data}
    errors = data.get("messages") or data.get("errors")
    response = error_response(error.code or 500, message, errors=errors, **extra)
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    for name, value in (data.get("headers") or {}).items():
        response.headers[name] = value
    return response


def handle_service_error(error: ServiceError) -> Response:
    return error_response(error.status_code, error.message, errors=error.errors)


def handle_unexpected(error: Exception) -> Response:
    log.exception("unhandled error: %s", type(error).__name__)
    return error_response(500, InternalServerError.description)


def register_error_handlers(app: Flask, jwt: JWTManager) -> None:
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(ServiceError, handle_service_error)
    app.register_error_handler(Exception, handle_unexpected)

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
