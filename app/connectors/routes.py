from __future__ import annotations

import uuid

from flask.views import MethodView

from app.auth import current_host_id, host_required
from app.connectors import service
from app.connectors.models import Connector
from app.connectors.schemas import (
    ConnectorCreateSchema,
    ConnectorListSchema,
    ConnectorSchema,
    ConnectorUpdateSchema,
)
from app.errors import LAST_CONNECTOR, documents_errors
from app.extensions import Blueprint, limiter

blp = Blueprint("connectors", __name__, url_prefix="/api/connectors", description="Communication channels of a Host")


@blp.route("")
class Connectors(MethodView):
    decorators = [host_required]

    @limiter.limit("100 per minute")
    @blp.response(200, ConnectorListSchema)
    @documents_errors(blp, 401, 429, 503)
    def get(self) -> dict[str, list[Connector]]:
        """List the Host's connectors, by priority then creation time

        The order is the one dispatch tries them in. `is_verified` says whether the last test, check or daily
        re-check of the current config succeeded. No config is ever returned. 100 requests a minute per Host.
        """
        return {"connectors": service.list_connectors(current_host_id())}

    @limiter.limit("10 per hour")
    @blp.arguments(ConnectorCreateSchema)
    @blp.response(201, ConnectorSchema)
    @documents_errors(blp, 401, 409, 413, 429, 503)
    def post(self, data: dict) -> Connector:
        """Create a connector; its config is sealed and never returned

        The config is validated for its `type` (README, "Connector configs") and sealed at rest; the connector
        starts unverified, and its first daily re-check comes at a random moment within the interval. A second
        connector of one type with one name is a 409. 10 creates an hour per Host.
        """
        return service.create_connector(current_host_id(), data)


@blp.route("/<uuid:connector_id>")
class ConnectorById(MethodView):
    decorators = [host_required]

    @blp.arguments(ConnectorUpdateSchema)
    @blp.response(200, ConnectorSchema)
    @documents_errors(blp, 401, 404, 409, 413, 503)
    def put(self, data: dict, connector_id: uuid.UUID) -> Connector:
        """Update name, priority or config (a new config resets is_verified)

        A partial update: only the fields given change. A new config replaces the whole config, turns
        `is_verified` false and brings the next re-check forward. The type cannot change. A name another
        connector of the type has is a 409.
        """
        return service.update_connector(current_host_id(), connector_id, data)

    @blp.response(204)
    @documents_errors(blp, 401, 404, 409, 503, error_codes={409: (LAST_CONNECTOR,)})
    def delete(self, connector_id: uuid.UUID) -> None:
        """Delete a connector (not the last one while the will is active)

        Its tests and checks go with it; dispatch attempts stay in their messages' history. While the Host's
        will is active its last connector cannot be deleted (409 `last_connector`).
        """
        service.delete_connector(current_host_id(), connector_id)
