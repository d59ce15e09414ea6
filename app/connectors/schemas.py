"""Request and response schemas for connectors; each type's config schema lives with its type."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from app.channels import CHANNELS, TYPE_NAMES, load_config
from app.fields import Name, StrictInteger, UtcTimestamp

PRIORITY = validate.Range(0, 1_000_000)


class ConnectorSchema(Schema):
    id = fields.UUID(dump_only=True)
    type = fields.String(dump_only=True, metadata={"enum": list(TYPE_NAMES)})
    name = fields.String(dump_only=True)
    is_verified = fields.Boolean(dump_only=True, metadata={"description": "Whether the connector is working"})
    priority = fields.Integer(dump_only=True, metadata={"description": "Send priority (0 = highest)"})
    created_at = UtcTimestamp(dump_only=True)


class ConnectorListSchema(Schema):
    connectors = fields.List(fields.Nested(ConnectorSchema))


class ConnectorCreateSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(TYPE_NAMES))
    name = Name(required=True)
    priority = StrictInteger(load_default=0, validate=PRIORITY)
    config = fields.Dict(required=True, metadata={"description": "Per-type settings (README); write-only."})

    @validates_schema(skip_on_field_errors=False)
    def check_config(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("type") in TYPE_NAMES and "config" in data:
            try:
                data["config"] = load_config(data["type"], data["config"])
            except ValidationError as exc:
                raise ValidationError(exc.messages, field_name="config") from None


def _create_variant(type_name: str, config_schema: type[Schema]) -> type[Schema]:
    """The create body of one type, for the docs: the same fields, `type` fixed and `config` its schema."""
    return type(
        f"{config_schema.__name__.removesuffix('Config')}ConnectorCreateSchema",
        (ConnectorCreateSchema,),
        {
            "type": fields.String(required=True, validate=validate.OneOf([type_name])),
            "config": fields.Nested(config_schema, required=True, metadata={"description": "Write-only."}),
        },
    )


ConnectorCreateSchema.OPENAPI_ONE_OF = (  # type: ignore[attr-defined]
    "type",
    {name: _create_variant(name, kind.config_schema) for name, kind in CHANNELS.items()},
)


class ConnectorUpdateSchema(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(metadata={"description": "Cannot change; accepted only when equal to the current."})
    name = Name()
    priority = StrictInteger(validate=PRIORITY)
    config = fields.Dict(metadata={"description": "Replaces the whole config; resets is_verified."})

    @validates_schema
    def not_empty(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not data.keys() & {"name", "priority", "config"}:
            raise ValidationError("Provide at least one of name, priority, config.", field_name="_schema")
