"""Schemas of the dispatch API: a message to deliver, and what became of it (never its words)."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from app.attempts import RECEIPTS
from app.attempts import STATUSES as ATTEMPT_STATUSES
from app.channels import TYPE_NAMES
from app.channels.telegram import chat_id
from app.fields import (
    E164,
    NO_NUL_PATTERN,
    ONE_LINE_PATTERN,
    PRINTABLE_ASCII,
    EmailAddress,
    FullMatch,
    StrictInteger,
    UtcTimestamp,
    no_nul,
    one_line,
)
from app.messages.models import CONFIRM_DELIVERED, PURPOSES, STATUSES

MIN_EXPIRES_IN, MAX_EXPIRES_IN = 5, 2_592_000


class TelegramChat(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        one_line(text)  # `chat_id` trims whitespace, a trailing CR or LF with it
        return chat_id(text)


class RecipientSchema(Schema):
    class Meta:
        unknown = RAISE

    email = EmailAddress(metadata={"description": "Reached by email connectors"})
    phone = E164(metadata={"description": "E.164; reached by sms and whatsapp connectors"})
    telegram_chat_id = TelegramChat(
        metadata={"description": "A numeric chat id or @channelname; reached by telegram connectors"}
    )

    @validates_schema
    def at_least_one(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data:
            raise ValidationError("Give at least one of email, phone, telegram_chat_id.", field_name="_schema")


class ConfirmSchema(Schema):
    class Meta:
        unknown = RAISE

    by = fields.String(
        required=True,
        validate=validate.OneOf([CONFIRM_DELIVERED]),
        metadata={"description": "delivered: a provider's receipt must say the message reached the recipient"},
    )
    within = StrictInteger(
        load_default=600,
        validate=validate.Range(15, 86400),
        metadata={"description": "Seconds to wait for the receipt before the next channel is tried"},
    )


class MessageCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    purpose = fields.String(required=True, validate=validate.OneOf(PURPOSES))
    recipient = fields.Nested(RecipientSchema, required=True)
    subject = fields.String(
        validate=[validate.Length(1, 255), one_line],
        metadata={"description": "Email only; by purpose", "pattern": ONE_LINE_PATTERN},
    )
    text = fields.String(
        required=True, validate=[validate.Length(1, 4000), no_nul], metadata={"pattern": NO_NUL_PATTERN}
    )
    html = fields.String(
        allow_none=True,
        validate=[validate.Length(1, 60_000), no_nul],
        metadata={"description": "Email only", "pattern": NO_NUL_PATTERN},
    )
    channels = fields.List(
        fields.String(validate=validate.OneOf(TYPE_NAMES)),
        validate=validate.Length(1, len(TYPE_NAMES)),
        metadata={"description": "Restricts the connector types used"},
    )
    expires_in = StrictInteger(
        validate=validate.Range(MIN_EXPIRES_IN, MAX_EXPIRES_IN),
        metadata={"description": "Seconds; 600 for otp, 7 days otherwise"},
    )
    confirm = fields.Nested(
        ConfirmSchema, metadata={"description": "Wait for the provider's receipt before giving up a channel"}
    )


class IdempotencyKeySchema(Schema):
    class Meta:
        unknown = "exclude"

    key = fields.String(
        data_key="Idempotency-Key",
        required=True,
        validate=[validate.Length(1, 255), FullMatch(PRINTABLE_ASCII.regex.pattern, error="Must be printable ASCII.")],
    )


class DeliveredViaSchema(Schema):
    connector_id = fields.UUID()
    type = fields.String()


class MessageAttemptSchema(Schema):
    connector_id = fields.UUID(allow_none=True)
    type = fields.String(attribute="connector_type")
    destination = fields.String(allow_none=True, metadata={"description": "Masked"})
    status = fields.String(
        metadata={"enum": [status for status in ATTEMPT_STATUSES if status not in ("pending", "verified")]}
    )
    error_code = fields.String(allow_none=True)
    message = fields.String(allow_none=True)
    delivery_time_ms = fields.Integer(allow_none=True)
    started_at = UtcTimestamp(attribute="created_at")
    finished_at = UtcTimestamp(allow_none=True)
    provider_message_id = fields.String(
        allow_none=True, metadata={"description": "The provider's id of what it accepted (SID, wamid, message_id)"}
    )
    receipt = fields.String(
        allow_none=True,
        metadata={"enum": [*RECEIPTS, None], "description": "What the provider's receipts said since: forward only"},
    )
    receipt_at = UtcTimestamp(allow_none=True)


class MessageSchema(Schema):
    id = fields.UUID()
    host_id = fields.UUID()
    purpose = fields.String(metadata={"enum": list(PURPOSES)})
    status = fields.String(metadata={"enum": list(STATUSES)})
    created_at = UtcTimestamp()
    expires_at = UtcTimestamp()
    delivered_at = UtcTimestamp(allow_none=True)
    delivered_via = fields.Nested(DeliveredViaSchema, allow_none=True)
    attempts = fields.List(fields.Nested(MessageAttemptSchema))


class MessageListSchema(Schema):
    messages = fields.List(fields.Nested(MessageSchema))


class MessageQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(STATUSES))
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
