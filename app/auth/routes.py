from __future__ import annotations

import uuid

from flask.views import MethodView
from marshmallow import Schema, fields

from app.auth import service, service_required
from app.auth.models import Host
from app.errors import documents_errors
from app.extensions import Blueprint

blp = Blueprint("internal", __name__, url_prefix="/api/internal", description="Calls from other BAPBA services")


class WillStateSchema(Schema):
    active = fields.Boolean(required=True, metadata={"description": "Whether the Host's will is active"})


class WillStateOutSchema(Schema):
    host_id = fields.UUID(attribute="id")
    will_active = fields.Boolean()


@blp.route("/hosts/<uuid:host_id>/will")
class HostWill(MethodView):
    decorators = [service_required]

    @blp.arguments(WillStateSchema)
    @blp.response(200, WillStateOutSchema)
    @documents_errors(blp, 401, 403, 413, 503)
    def put(self, data: dict, host_id: uuid.UUID) -> Host:
        """Record whether a Host's will is active (will service only)

        While it is active, the Host's last connector cannot be deleted. The Host is created if it is new.
        """
        return service.set_will_active(host_id, data["active"])
