from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from app.connectors.schemas import UtcTimestamp


class SendTestSchema(Schema):
    class Meta:
        unknown = RAISE

    test_destination = fields.String(
        required=True,
        validate=validate.Length(1, 320),
        metadata={
            "description": "email: an address; sms, whatsapp: an E.164 number; "
            "telegram: a numeric chat id (negative for groups) or @channelname"
        },
    )


class SendTestResultSchema(Schema):
    success = fields.Boolean(required=True)
    message = fields.String(required=True)
    delivery_time_ms = fields.Integer(required=True)


class AttemptSchema(Schema):
    id = fields.UUID()
    destination = fields.String(metadata={"description": "Masked"})
    status = fields.String(metadata={"description": "pending, sending, sent, failed or timeout"})
    error_code = fields.String(allow_none=True)
    message = fields.String(allow_none=True)
    delivery_time_ms = fields.Integer(allow_none=True)
    created_at = UtcTimestamp(metadata={"type": "string", "format": "date-time"})
    finished_at = UtcTimestamp(allow_none=True, metadata={"type": "string", "format": "date-time"})


class AttemptListSchema(Schema):
    deliveries = fields.List(fields.Nested(AttemptSchema))


class AttemptQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
