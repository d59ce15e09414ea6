from __future__ import annotations

import uuid

from flask.views import MethodView
from flask_smorest import abort

from app.attempts import DeliveryAttempt
from app.auth import current_host_id, host_required
from app.deliveries import service
from app.deliveries.schemas import (
    AttemptListSchema,
    AttemptQuerySchema,
    CheckResultSchema,
    SendTestResultSchema,
    SendTestSchema,
)
from app.errors import documents_errors
from app.extensions import Blueprint, limiter
from app.outcomes import Outcome

blp = Blueprint("deliveries", __name__, url_prefix="/api/connectors", description="Test deliveries")

FAILURE_STATUS = {"broker_unavailable": 503}


def succeeded(outcome: Outcome) -> Outcome:
    """The outcome of a success; a failure answers 502 (503 when the job could not be queued) with its code."""
    if not outcome.success:
        abort(
            FAILURE_STATUS.get(outcome.error_code or "", 502),
            message=outcome.message,
            success=False,
            error_code=outcome.error_code,
        )
    return outcome


@blp.route("/<uuid:connector_id>/test")
class ConnectorTest(MethodView):
    decorators = [host_required]

    @limiter.limit("10 per hour")
    @blp.arguments(SendTestSchema)
    @blp.response(200, SendTestResultSchema)
    @documents_errors(blp, 401, 404, 409, 413, 429, 502, 503)
    def post(self, data: dict, connector_id: uuid.UUID) -> dict:
        """Send a test message through the connector and report how long the provider took"""
        outcome = succeeded(service.run_test(current_host_id(), connector_id, data["test_destination"]))
        return {"success": True, "message": outcome.message, "delivery_time_ms": outcome.delivery_time_ms}


@blp.route("/<uuid:connector_id>/verify")
class ConnectorVerify(MethodView):
    decorators = [host_required]

    @limiter.limit("10 per hour")
    @blp.response(200, CheckResultSchema)
    @documents_errors(blp, 401, 404, 409, 429, 502, 503)
    def post(self, connector_id: uuid.UUID) -> dict:
        """Check the credentials and the sender without delivering a message to anyone"""
        outcome = succeeded(service.run_check(current_host_id(), connector_id))
        return {
            "success": True,
            "message": outcome.message,
            "check_time_ms": outcome.delivery_time_ms,
            "details": outcome.details or {},
        }


@blp.route("/<uuid:connector_id>/deliveries")
class ConnectorDeliveries(MethodView):
    decorators = [host_required]

    @blp.arguments(AttemptQuerySchema, location="query")
    @blp.response(200, AttemptListSchema)
    @documents_errors(blp, 401, 404, 503)
    def get(self, query: dict, connector_id: uuid.UUID) -> dict[str, list[DeliveryAttempt]]:
        """The connector's tests, checks and dispatch attempts, newest first"""
        return {"deliveries": service.list_attempts(current_host_id(), connector_id, query["limit"])}
