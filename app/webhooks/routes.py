"""The providers' callbacks: no token, each authenticated by its provider's signature (README, "Receipts")."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, request
from flask.views import MethodView
from marshmallow import Schema, fields
from werkzeug.exceptions import RequestEntityTooLarge

from app.errors import ErrorEnvelopeSchema, documents_errors
from app.extensions import Blueprint, limiter
from app.webhooks import service

blp = Blueprint(
    "webhooks", __name__, url_prefix="/api/webhooks", description="Providers' receipts (signed callbacks, no token)"
)

# Per connector, whichever of its routes is called: a flood on one connector's address cannot starve the API,
# nor another connector's receipts.
WEBHOOK_LIMIT = "600 per minute"


def _per_connector() -> str:
    return f"webhooks:{request.view_args['connector_id']}" if request.view_args else "webhooks"


def _bounded_body() -> bytes:
    """The raw body, at most 64 KiB (or MAX_BODY_BYTES, when smaller), or a 413."""
    configured = current_app.config.get("MAX_CONTENT_LENGTH") or service.MAX_BODY_BYTES
    limit = min(configured, service.MAX_BODY_BYTES)
    request.max_content_length = limit
    raw = request.get_data(cache=True)
    # A chunked body has no Content-Length and werkzeug stops reading it at the limit without a word.
    if request.content_length is None and len(raw) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return raw


def _webhook(*statuses: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """What every callback route shares: no token, the per-connector limit, the refusals it can answer."""
    return lambda view: _shared(documents_errors(blp, *statuses, 429, 503)(view))


def _shared(view: Callable[..., Any]) -> Callable[..., Any]:
    view = blp.alt_response(
        403,
        schema=ErrorEnvelopeSchema,
        description="Not accepted: a missing or wrong signature, an unknown connector, a connector without the "
        "secret to check it, or no PUBLIC_BASE_URL; the same answer for each, and nothing changes",
    )(view)
    view = blp.alt_response(404, schema=ErrorEnvelopeSchema, description="The connector id is not a uuid")(view)
    view = blp.doc(security=[])(view)
    return limiter.shared_limit(WEBHOOK_LIMIT, scope="webhooks", key_func=_per_connector)(view)


class RecordedSchema(Schema):
    recorded = fields.Integer(
        required=True, metadata={"description": "How many of its statuses named a message this connector sent"}
    )


TWILIO_FORM = {
    "type": "object",
    "properties": {
        "MessageSid": {"type": "string", "description": "The message's SID, as Twilio answered the send"},
        "MessageStatus": {
            "type": "string",
            "description": "delivered, read; undelivered or failed (receipt `undelivered`); "
            "queued, sending, sent, accepted... change nothing",
        },
        "ErrorCode": {"type": "string", "description": "Twilio's error code, for undelivered and failed"},
    },
    "required": ["MessageSid", "MessageStatus"],
}

_STATUS = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "The wamid, as Meta answered the send"},
        "status": {
            "type": "string",
            "description": "delivered, read; failed (receipt `undelivered`); sent changes nothing",
        },
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"code": {"type": "integer"}, "title": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "required": ["id", "status"],
}
WHATSAPP_PAYLOAD = {
    "type": "object",
    "properties": {
        "object": {"type": "string"},
        "entry": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "changes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "field": {"type": "string"},
                                "value": {
                                    "type": "object",
                                    "properties": {"statuses": {"type": "array", "items": _STATUS}},
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


@blp.route("/twilio/<uuid:connector_id>")
class TwilioReceipts(MethodView):
    @_webhook(400, 413)
    @blp.response(204, description="Taken, whether or not it named a message this connector sent")
    @blp.doc(
        parameters=[
            {
                "in": "header",
                "name": "X-Twilio-Signature",
                "required": True,
                "schema": {"type": "string"},
                "description": "Twilio's signature of the callback URL and the form's fields with the Auth Token",
            }
        ],
        requestBody={"required": True, "content": {"application/x-www-form-urlencoded": {"schema": TWILIO_FORM}}},
    )
    def post(self, connector_id: uuid.UUID) -> None:
        """Twilio's status callback for an SMS this connector sent

        Twilio posts here the StatusCallback each send names, `{PUBLIC_BASE_URL}/api/webhooks/twilio/{id}`.
        `X-Twilio-Signature` is checked with the connector's Auth Token over that URL (never the request's Host)
        and the form's fields. `delivered` and `read` confirm; `undelivered` and `failed` record the receipt
        `undelivered` with Twilio's error code; other statuses change nothing.
        """
        _bounded_body()
        service.twilio_callback(connector_id, request.headers.get("X-Twilio-Signature"), request.form)


@blp.route("/whatsapp/<uuid:connector_id>")
class WhatsAppReceipts(MethodView):
    @_webhook(400)
    @blp.response(
        200, {"type": "string"}, content_type="text/plain", description="The verify token matches: hub.challenge"
    )
    @blp.doc(
        parameters=[
            {"in": "query", "name": "hub.mode", "required": True, "schema": {"type": "string", "enum": ["subscribe"]}},
            {"in": "query", "name": "hub.verify_token", "required": True, "schema": {"type": "string"}},
            {"in": "query", "name": "hub.challenge", "required": True, "schema": {"type": "string", "maxLength": 256}},
        ]
    )
    def get(self, connector_id: uuid.UUID) -> Response:
        """Meta's webhook handshake for this WhatsApp connector

        Meta calls it when the Host saves the callback URL in the app's dashboard: with `hub.mode=subscribe` and
        `hub.verify_token` equal to the connector's `webhook_verify_token` (compared in constant time), it
        answers `hub.challenge` as text/plain; otherwise 403. The connector needs `app_secret` too.
        """
        challenge = service.whatsapp_handshake(
            connector_id, request.args.get("hub.mode"), request.args.get("hub.verify_token"),
            request.args.get("hub.challenge"),
        )  # fmt: skip
        return Response(challenge, status=200, mimetype="text/plain")

    @_webhook(400, 413)
    @blp.response(200, RecordedSchema, description="Taken, whether or not it named a message this connector sent")
    @blp.doc(
        parameters=[
            {
                "in": "header",
                "name": "X-Hub-Signature-256",
                "required": True,
                "schema": {"type": "string"},
                "description": "sha256= and the hex HMAC-SHA256 of the raw body with the Meta app secret",
            }
        ],
        requestBody={"required": True, "content": {"application/json": {"schema": WHATSAPP_PAYLOAD}}},
    )
    def post(self, connector_id: uuid.UUID) -> dict[str, int]:
        """Meta's webhook call: the statuses of messages this WhatsApp connector sent

        `X-Hub-Signature-256` is checked over the raw body with the connector's `app_secret` before the body is
        read. Each of `entry[].changes[].value.statuses[]` names a message by its wamid: `delivered` and `read`
        confirm, `failed` records the receipt `undelivered` with Meta's error; other statuses change nothing.
        """
        body = _bounded_body()
        return {"recorded": service.whatsapp_callback(connector_id, request.headers.get("X-Hub-Signature-256"), body)}
