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
from app.errors import BUSY, IN_PROGRESS, documents_errors
from app.extensions import Blueprint, limiter
from app.outcomes import BROKER_UNAVAILABLE, PROVIDER_CAUSED, TIMEOUT, WORKER_ERROR, Outcome

blp = Blueprint("deliveries", __name__, url_prefix="/api/connectors", description="Test deliveries")

FAILURE_STATUS = {BROKER_UNAVAILABLE: 503}
# The error codes a test or check can answer, by status.
PROBE_ERRORS = {
    409: (IN_PROGRESS,),
    502: (*sorted(PROVIDER_CAUSED), TIMEOUT, WORKER_ERROR),
    503: (BUSY, BROKER_UNAVAILABLE),
}


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
    @documents_errors(blp, 401, 404, 409, 413, 429, 502, 503, error_codes=PROBE_ERRORS)
    def post(self, data: dict, connector_id: uuid.UUID) -> dict:
        """Send a test message through the connector and report how long the provider took

        The worker sends one test message to `test_destination` through the connector's provider and the request
        waits for it, up to TEST_DELIVERY_TIMEOUT. Its outcome sets `is_verified` when the provider gave a
        verdict, and is logged in the connector's deliveries. One test or check per connector at a time (409
        `in_progress`); 10 tests an hour per Host.
        """
        outcome = succeeded(service.run_test(current_host_id(), connector_id, data["test_destination"]))
        return {"success": True, "message": outcome.message, "delivery_time_ms": outcome.delivery_time_ms}


@blp.route("/<uuid:connector_id>/verify")
class ConnectorVerify(MethodView):
    decorators = [host_required]

    @limiter.limit("10 per hour")
    @blp.response(200, CheckResultSchema)
    @documents_errors(blp, 401, 404, 409, 429, 502, 503, error_codes=PROBE_ERRORS)
    def post(self, connector_id: uuid.UUID) -> dict:
        """Check the credentials and the sender without delivering a message to anyone

        Per type: SMTP up to MAIL FROM and RSET; Twilio's account and its incoming numbers; the WhatsApp number
        and the business account's list; Telegram's getMe. `details` holds only public facts. It sets
        `is_verified` as a test does; 10 checks an hour per Host, apart from the tests' limit.
        """
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
        """The connector's tests, checks and dispatch attempts, newest first

        Each with its `kind`, masked destination, status and error code; never a message's text.
        """
        return {"deliveries": service.list_attempts(current_host_id(), connector_id, query["limit"])}
