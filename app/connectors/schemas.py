"""Request and response schemas for connectors; one config schema per connector type."""

from __future__ import annotations

import unicodedata
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from flask import current_app
from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    validate,
    validates_schema,
)

from app.connectors.models import CONNECTOR_TYPES
from worker.providers.base import literal_host_blocked

DEFAULT_WHATSAPP_API_VERSION = "v24.0"


class FullMatch(validate.Regexp):
    """Regexp on the whole value: `re.match` with `$` would let a trailing newline through."""

    def __call__(self, value: str) -> str:
        if not isinstance(value, str) or self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class StrictInteger(fields.Integer):
    """An integer in the JSON sense: no strings, floats or booleans."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError("Must be an integer.")
        return value


class TrimmedName(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip()
        if not 1 <= len(text) <= 100:
            raise ValidationError("Must be 1 to 100 characters after trimming.")
        if any(unicodedata.category(char) == "Cc" for char in text):
            raise ValidationError("Must not contain control characters.")
        return text


TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class UtcTimestamp(fields.Field):
    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else value.strftime(TIMESTAMP_FORMAT)


def e164(value: str) -> str:
    """The number in E.164 form, or ValidationError."""
    if not isinstance(value, str) or not value.startswith("+"):
        raise ValidationError("Must be an E.164 phone number such as +14155550123.")
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ValidationError("Must be an E.164 phone number such as +14155550123.") from None
    if not phonenumbers.is_valid_number(number):
        raise ValidationError("Not a valid phone number.")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def email_address(value: str) -> str:
    """The normalized address, or ValidationError."""
    if not isinstance(value, str) or len(value) > 320:
        raise ValidationError("Must be a valid email address.")
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValidationError(f"Must be a valid email address: {exc}") from None


class E164(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return e164(super()._deserialize(value, attr, data, **kwargs))


class EmailAddress(fields.String):
    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return email_address(super()._deserialize(value, attr, data, **kwargs))


PRINTABLE_ASCII = FullMatch(r"[\x20-\x7e]+", error="Must be printable ASCII characters.")


def _secret(max_length: int = 4096) -> fields.String:
    # Providers carry credentials in ASCII-only places (HTTP headers, SMTP AUTH): anything else cannot work.
    return fields.String(required=True, validate=[validate.Length(1, max_length), PRINTABLE_ASCII], load_only=True)


def _hostname(value: str) -> None:
    if any(char.isspace() for char in value) or "/" in value or "@" in value:
        raise ValidationError("Must be a host name or IP address, without scheme or path.")
    if not current_app.config["ALLOW_PRIVATE_DESTINATIONS"] and literal_host_blocked(value):
        raise ValidationError("Loopback, private, link-local and reserved addresses are not allowed.")


class EmailConfig(Schema):
    class Meta:
        unknown = RAISE

    smtp_host = fields.String(required=True, validate=[validate.Length(1, 253), _hostname])
    smtp_port = StrictInteger(required=True, validate=validate.Range(1, 65535))
    username = fields.String(required=True, validate=[validate.Length(1, 320), PRINTABLE_ASCII])
    password = _secret(1024)
    from_address = EmailAddress(required=True)
    security = fields.String(validate=validate.OneOf(["starttls", "ssl", "none"]))

    @post_load
    def default_security(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data.setdefault("security", "ssl" if data["smtp_port"] == 465 else "starttls")
        return data


class SmsConfig(Schema):
    class Meta:
        unknown = RAISE

    provider = fields.String(required=True, validate=validate.Equal("twilio"))
    api_key_sid = fields.String(
        required=True,
        validate=FullMatch(r"^(SK|AC)[0-9a-fA-F]{32}$", error="Must be a Twilio SID: SK or AC and 32 hex."),
    )
    api_key_secret = _secret(256)
    account_sid = fields.String(
        validate=FullMatch(r"^AC[0-9a-fA-F]{32}$", error="Must be a Twilio account SID: AC and 32 hex.")
    )
    from_number = E164(required=True)


class WhatsAppConfig(Schema):
    class Meta:
        unknown = RAISE

    digits = FullMatch(r"^[0-9]{1,32}$", error="Must be a string of digits.")

    provider = fields.String(required=True, validate=validate.Equal("whatsapp"))
    access_token = _secret(4096)
    phone_number_id = fields.String(required=True, validate=digits)
    business_account_id = fields.String(required=True, validate=digits)
    api_version = fields.String(
        load_default=DEFAULT_WHATSAPP_API_VERSION,
        validate=FullMatch(r"^v[0-9]{1,3}\.[0-9]{1,3}$", error="Must look like v24.0."),
    )
    template_name = fields.String(
        validate=FullMatch(r"^[a-z0-9_]{1,512}$", error="Lower-case letters, digits and underscores.")
    )
    template_language = fields.String(
        validate=FullMatch(r"^[a-z]{2,3}(_[A-Z]{2})?$", error="Must look like en or en_US.")
    )


class TelegramConfig(Schema):
    class Meta:
        unknown = RAISE

    provider = fields.String(required=True, validate=validate.Equal("telegram"))
    bot_token = fields.String(
        required=True,
        load_only=True,
        validate=FullMatch(
            r"^[0-9]{3,20}:[A-Za-z0-9_-]{20,100}$", error="Must be a Telegram bot token: <digits>:<token>."
        ),
    )


CONFIG_SCHEMAS: dict[str, type[Schema]] = {
    "email": EmailConfig,
    "sms": SmsConfig,
    "whatsapp": WhatsAppConfig,
    "telegram": TelegramConfig,
}


def load_config(connector_type: str, config: Any) -> dict[str, Any]:
    """Validate a config for its type; ValidationError messages are keyed by config field."""
    if not isinstance(config, dict):
        raise ValidationError("Must be an object.")
    return CONFIG_SCHEMAS[connector_type]().load(config)


class ConnectorSchema(Schema):
    id = fields.UUID(dump_only=True)
    type = fields.String(dump_only=True)
    name = fields.String(dump_only=True)
    is_verified = fields.Boolean(dump_only=True)
    priority = fields.Integer(dump_only=True)
    created_at = UtcTimestamp(dump_only=True, metadata={"type": "string", "format": "date-time"})


class ConnectorListSchema(Schema):
    connectors = fields.List(fields.Nested(ConnectorSchema))


class ConnectorCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(CONNECTOR_TYPES))
    name = TrimmedName(required=True)
    priority = StrictInteger(load_default=0, validate=validate.Range(0, 1_000_000))
    config = fields.Dict(required=True, metadata={"description": "Per-type settings; write-only."})

    @validates_schema(skip_on_field_errors=False)
    def check_config(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("type") in CONFIG_SCHEMAS and "config" in data:
            try:
                data["config"] = load_config(data["type"], data["config"])
            except ValidationError as exc:
                raise ValidationError(exc.messages, field_name="config") from None


class ConnectorUpdateSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(metadata={"description": "Cannot change; accepted only when equal to the current."})
    name = TrimmedName()
    priority = StrictInteger(validate=validate.Range(0, 1_000_000))
    config = fields.Dict(metadata={"description": "Replaces the whole config; resets is_verified."})

    @validates_schema
    def not_empty(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.keys() & {"name", "priority", "config"}:
            raise ValidationError("Provide at least one of name, priority, config.", field_name="_schema")
