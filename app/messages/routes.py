from __future__ import annotations

import uuid

from flask import current_app, request
from flask.views import MethodView

from app.auth import service_required
from app.errors import CONFIRM_UNAVAILABLE, IDEMPOTENCY_KEY_REUSED, NO_ROUTE, documents_errors
from app.extensions import Blueprint, limiter
from app.messages import service
from app.messages.schemas import (
    IdempotencyKeySchema,
    MessageCreateSchema,
    MessageListSchema,
    MessageQuerySchema,
    MessageSchema,
)

blp = Blueprint(
    "messages", __name__, url_prefix="/api/internal", description="Dispatch through a Host's connectors (services)"
)


def _dispatch_limit() -> str:
    return current_app.config["DISPATCH_LIMIT"]


def _per_host() -> str:
    """Each Host's messages count apart (the caller is the will service for all of them)."""
    return f"dispatch:{request.view_args['host_id']}" if request.view_args else "dispatch"


@blp.route("/hosts/<uuid:host_id>/messages")
class HostMessages(MethodView):
    decorators = [service_required]

    # A replay of a message already taken (200) costs nothing: only new messages (202) count.
    @limiter.limit(_dispatch_limit, key_func=_per_host, deduct_when=lambda response: response.status_code == 202)
    @blp.arguments(IdempotencyKeySchema, location="headers")
    @blp.arguments(MessageCreateSchema)
    @blp.response(202, MessageSchema, description="Accepted: the message is stored and will be dispatched")
    @blp.alt_response(200, schema=MessageSchema, description="The message this Idempotency-Key already made")
    @documents_errors(
        blp, 401, 403, 404, 413, 422, 429, 503,
        error_codes={422: (NO_ROUTE, IDEMPOTENCY_KEY_REUSED, CONFIRM_UNAVAILABLE)},
    )  # fmt: skip
    def post(self, headers: dict, data: dict, host_id: uuid.UUID) -> tuple[dict, int]:
        """Deliver a notification or OTP through the Host's connectors, in priority order with fallback

        The message is stored (its words sealed) before the 202, then tried through each connector that can
        reach the recipient, in the Host's order, until a provider accepts it; rounds repeat after a backoff
        until `expires_at`. The same Idempotency-Key with the same body answers 200 with the same message;
        with another body, 422 `idempotency_key_reused`. No connector can reach the recipient: 422 `no_route`.
        Each Host may be sent DISPATCH_LIMIT messages (600 a minute by default); beyond, 429 with Retry-After.
        """
        message, created = service.create_message(host_id, headers["key"], data)
        return service.view(message), 202 if created else 200

    @blp.arguments(MessageQuerySchema, location="query")
    @blp.response(200, MessageListSchema)
    @documents_errors(blp, 401, 403, 404, 503)
    def get(self, query: dict, host_id: uuid.UUID) -> dict:
        """A Host's messages, newest first

        Optionally of one `status`; each with its attempts, masked, never its text.
        """
        messages = service.list_messages(host_id, query.get("status"), query["limit"])
        return {"messages": service.views(messages)}


@blp.route("/messages/<uuid:message_id>")
class MessageById(MethodView):
    decorators = [service_required]

    @blp.response(200, MessageSchema)
    @documents_errors(blp, 401, 403, 404, 503)
    def get(self, message_id: uuid.UUID) -> dict:
        """A message, its status and every attempt, oldest first (never its text)

        Each attempt names its connector and type, the masked destination, its status and error code.
        """
        return service.view(service.get_message(message_id))
