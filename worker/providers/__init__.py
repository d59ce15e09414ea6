"""Providers by connector type, imported when first used (the web process never needs them)."""

from __future__ import annotations

from importlib import import_module

from worker.providers.base import Provider, ProviderSettings

PROVIDERS: dict[str, str] = {
    "email": "worker.providers.email:EmailProvider",
    "sms": "worker.providers.sms:TwilioSmsProvider",
    "whatsapp": "worker.providers.whatsapp:WhatsAppProvider",
    "telegram": "worker.providers.telegram:TelegramProvider",
}


def build_provider(connector_type: str, settings: ProviderSettings) -> Provider:
    module, _, name = PROVIDERS[connector_type].partition(":")
    return getattr(import_module(module), name)(settings)
