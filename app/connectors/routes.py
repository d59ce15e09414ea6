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
from app.errors import documents_errors
from app.extensions import Blueprint, limiter

blp = Blueprint("connectors", __name__, url_prefix="/api/connectors", description="Communication channels of a Host")


@blp.route("")
class Connectors(MethodView):
    decorators = [host_required]

    @limiter.limit("100 per minute")
    @blp.response(200, ConnectorListSchema)
    @documents_errors(blp, 401, 429, 503)
    def get(self) -> dict[str, list[Connector]]:
        """List the Host's connectors, by priority then creation time"""
        return {"connectors": service.list_connectors(current_host_id())}

    @limiter.limit("10 per hour")
    @blp.arguments(ConnectorCreateSchema)
    @blp.response(201, ConnectorSchema)
    @documents_errors(blp, 401, 409, 413, 429, 503)
    def post(self, data: dict) -> Connector:
        """Create a connector; its config is sealed and never returned"""
        return service.create_connector(current_host_id(), data)


@blp.route("/<uuid:connector_id>")
class ConnectorById(MethodView):
    decorators = [host_required]

    @blp.arguments(ConnectorUpdateSchema)
    @blp.response(200, ConnectorSchema)
    @documents_errors(blp, 401, 404, 409, 413, 503)
    def put(self, data: dict, connector_id: uuid.UUID) -> Connector:
        """Update name, priority or config (a new config resets is_verified)"""
        return service.update_connector(current_host_id(), connector_id, data)

    @blp.response(204)
    @documents_errors(blp, 401, 404, 409, 503)
    def delete(self, connector_id: uuid.UUID) -> None:
        """Delete a connector (not the last one while the will is active)"""
        service.delete_connector(current_host_id(), connector_id)
