from __future__ import annotations

from flask.views import MethodView
from marshmallow import RAISE, Schema, fields, validate

from app.auth import service_required
from app.errors import documents_errors
from app.events import service
from app.events.models import EVENT_TYPES
from app.extensions import Blueprint

blp = Blueprint("events", __name__, url_prefix="/api/internal", description="Signed events, also to poll (services)")


class EventSchema(Schema):
    id = fields.Integer(metadata={"description": "Increasing; pass the last one seen as `after`"})
    type = fields.String(metadata={"enum": list(EVENT_TYPES)})
    timestamp = fields.String(metadata={"format": "date-time"})
    data = fields.Dict(metadata={"description": "Ids, types, statuses and error codes; never a secret or address"})


class EventListSchema(Schema):
    events = fields.List(fields.Nested(EventSchema))


class EventQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    after = fields.Integer(load_default=0, validate=validate.Range(0, 2**31 - 1))  # ids are 32-bit integers
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))


@blp.route("/events")
class Events(MethodView):
    decorators = [service_required]

    @blp.arguments(EventQuerySchema, location="query")
    @blp.response(200, EventListSchema)
    @documents_errors(blp, 401, 403, 503)
    def get(self, query: dict) -> dict:
        """Events after the given id, oldest first: what EVENTS_WEBHOOK_URL receives, to poll instead

        Ids become visible in order, so a poller that passes the last id it saw never skips one. Events are
        kept EVENTS_RETENTION seconds.
        """
        return {"events": [service.as_json(event) for event in service.list_events(query["after"], query["limit"])]}
