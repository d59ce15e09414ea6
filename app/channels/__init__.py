"""The connector types, found through one registry; each is one module of this package.

A type's module says everything about it: its config schema, its destination rule and mask, its provider
(send and verify) and its queue. The web and the worker both read it from here.
"""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError

from app.channels import email, sms, telegram, whatsapp
from app.channels.base import ChannelType

CHANNELS: dict[str, ChannelType] = {module.CHANNEL.name: module.CHANNEL for module in (email, sms, whatsapp, telegram)}
TYPE_NAMES: tuple[str, ...] = tuple(CHANNELS)


def channel(name: str) -> ChannelType:
    return CHANNELS[name]


def load_config(type_name: str, config: Any) -> dict[str, Any]:
    """Validate a config for its type; ValidationError messages are keyed by config field."""
    if not isinstance(config, dict):
        raise ValidationError("Must be an object.")
    return CHANNELS[type_name].config_schema().load(config)


def check_allowed(type_name: str, config: dict[str, Any], allow_private: bool) -> None:
    """A valid config that this deployment's rules still refuse raises ValidationError keyed by config field."""
    refused = CHANNELS[type_name].refused_fields(config, allow_private)
    if refused:
        raise ValidationError(refused)
