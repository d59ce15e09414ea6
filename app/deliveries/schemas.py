from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from app.attempts import RECEIPTS, STATUSES
from app.fields import UtcTimestamp


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


class CheckResultSchema(Schema):
    success = fields.Boolean(required=True)
    message = fields.String(required=True)
    check_time_ms = fields.Integer(required=True)
    details = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={"description": "Public facts a Host would recognise: the bot's @username, the WhatsApp display "
                  "number and verified name, the SMTP server's greeting host name"},
    )  # fmt: skip


class AttemptSchema(Schema):
    id = fields.UUID()
    kind = fields.String(
        metadata={"enum": ["test", "check"], "description": "test: a test send; check: a credential check"}
    )
    destination = fields.String(allow_none=True, metadata={"description": "Masked; none for a check"})
    status = fields.String(
        metadata={
            "enum": list(STATUSES),
            "description": "sent: a test the provider accepted; verified: a check that passed (it sends nothing)",
        }
    )
    error_code = fields.String(allow_none=True)
    message = fields.String(allow_none=True)
    delivery_time_ms = fields.Integer(allow_none=True)
    created_at = UtcTimestamp()
    finished_at = UtcTimestamp(allow_none=True)
    provider_message_id = fields.String(allow_none=True, metadata={"description": "The provider's id of the send"})
    receipt = fields.String(
        allow_none=True, metadata={"enum": [*RECEIPTS, None], "description": "What its provider's receipts said"}
    )
    receipt_at = UtcTimestamp(allow_none=True)


class AttemptListSchema(Schema):
    deliveries = fields.List(fields.Nested(AttemptSchema))


class AttemptQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
