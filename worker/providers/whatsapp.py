"""WhatsApp Cloud API: POST {base}/{api_version}/{phone_number_id}/messages with a bearer token.

Outside the 24-hour customer-service window Meta accepts only templates; `template_name` in the config
sends that template instead of free text.
"""

from __future__ import annotations

from typing import Any

import httpx

from worker.providers.base import (
    AUTH_FAILED,
    CONFIG_INVALID,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    PROVIDER_UNREACHABLE,
    DeliveryError,
    OutgoingMessage,
    Provider,
    tls_context,
)

# Graph error codes: 190 expired/invalid token, 10 and 200-299 permissions.
AUTH_CODES = {190, 10, 102, 463, 467}
# Recipient problems: not a WhatsApp user / undeliverable, not in the test allow-list,
# outside the 24-hour window (template needed), invalid parameter (usually the number).
RECIPIENT_CODES = {131026, 131030, 131047, 131051, 131009, 100, 1013}


class WhatsAppProvider(Provider):
    type = "whatsapp"
    secret_fields = ("access_token",)

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
        url = f"{self.settings.whatsapp_base_url}/{config['api_version']}/{config['phone_number_id']}/messages"
        payload: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual"}
        payload["to"] = destination.lstrip("+")
        if config.get("template_name"):
            payload["type"] = "template"
            payload["template"] = {
                "name": config["template_name"],
                "language": {"code": config.get("template_language") or "en_US"},
            }
        else:
            payload["type"] = "text"
            payload["text"] = {"preview_url": False, "body": message.text}
        headers = {"Authorization": f"Bearer {config['access_token']}"}
        try:
            with httpx.Client(timeout=self.settings.timeout, follow_redirects=False, verify=tls_context()) as client:
                response = client.post(url, json=payload, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryError(PROVIDER_UNREACHABLE, "WhatsApp Cloud API did not answer in time") from None
        except httpx.HTTPError:
            raise DeliveryError(PROVIDER_UNREACHABLE, "cannot reach the WhatsApp Cloud API") from None
        except httpx.InvalidURL:
            raise DeliveryError(CONFIG_INVALID, "phone_number_id or api_version does not form a valid URL") from None
        if response.status_code == 200:
            try:
                messages = response.json().get("messages")
                accepted = isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict)
            except (ValueError, AttributeError):
                accepted = False
            if accepted:
                return
            raise DeliveryError(PROVIDER_ERROR, "WhatsApp Cloud API answered 200 without a message id")
        raise self._map(response)

    @staticmethod
    def _map(response: httpx.Response) -> DeliveryError:
        try:
            error = response.json().get("error") or {}
            code = error.get("code") if isinstance(error.get("code"), int) else 0
            text = str(error.get("message") or "")
        except (ValueError, AttributeError, TypeError):
            code, text = 0, ""
        detail = f"WhatsApp {response.status_code}" + (f" (error {code})" if code else "")
        if response.status_code == 401 or code in AUTH_CODES or 200 <= code < 300:
            return DeliveryError(AUTH_FAILED, f"WhatsApp rejected the access token: {detail} {text}".strip())
        if code == 131047:
            return DeliveryError(
                DESTINATION_REJECTED,
                f"WhatsApp: outside the 24-hour window a template is required; set template_name ({detail})",
            )
        if code in RECIPIENT_CODES:
            return DeliveryError(DESTINATION_REJECTED, f"WhatsApp rejected the recipient: {detail} {text}".strip())
        return DeliveryError(PROVIDER_ERROR, f"WhatsApp failed: {detail} {text}".strip())
