"""Providers by connector type."""

from __future__ import annotations

from worker.providers.base import Provider, ProviderSettings
from worker.providers.email import EmailProvider
from worker.providers.sms import TwilioSmsProvider
from worker.providers.telegram import TelegramProvider
from worker.providers.whatsapp import WhatsAppProvider

PROVIDERS: dict[str, type[Provider]] = {
    provider.type: provider for provider in (EmailProvider, TwilioSmsProvider, WhatsAppProvider, TelegramProvider)
}


def build_provider(connector_type: str, settings: ProviderSettings) -> Provider:
    return PROVIDERS[connector_type](settings)
