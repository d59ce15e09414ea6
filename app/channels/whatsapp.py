"""WhatsApp Cloud API: POST {base}/{api_version}/{phone_number_id}/messages with a bearer token.

Outside the 24-hour customer-service window Meta accepts only templates; `template_name` in the config
sends that template instead of free text.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from marshmallow import RAISE, Schema, fields, validate

from app.channels.base import ChannelType, DeliveryError, OutgoingMessage, Provider, cookieless_jar, tls_context
from app.channels.sms import mask_phone
from app.fields import FullMatch, credential, e164
from app.outcomes import (
    AUTH_FAILED,
    CONFIG_INVALID,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    PROVIDER_UNREACHABLE,
    SENDER_REJECTED,
)

if TYPE_CHECKING:
    import httpx

DEFAULT_API_VERSION = "v24.0"
# Graph error codes: 190 expired/invalid token, 10 and 200-299 permissions.
AUTH_CODES = {190, 10, 102, 463, 467}
# Recipient problems: not a WhatsApp user / undeliverable, not in the test allow-list,
# outside the 24-hour window (template needed), invalid parameter (usually the number).
RECIPIENT_CODES = {131026, 131030, 131047, 131051, 131009, 100, 1013}
DIGITS = FullMatch(r"^[0-9]{1,32}$", error="Must be a string of digits.")


class WhatsAppConfig(Schema):
    class Meta:
        unknown = RAISE

    provider = fields.String(required=True, validate=validate.Equal("whatsapp"))
    access_token = credential(4096)
    phone_number_id = fields.String(required=True, validate=DIGITS)
    business_account_id = fields.String(required=True, validate=DIGITS)
    api_version = fields.String(
        load_default=DEFAULT_API_VERSION,
        validate=FullMatch(r"^v[0-9]{1,3}\.[0-9]{1,3}$", error="Must look like v24.0."),
    )
    template_name = fields.String(
        validate=FullMatch(r"^[a-z0-9_]{1,512}$", error="Lower-case letters, digits and underscores.")
    )
    template_language = fields.String(
        validate=FullMatch(r"^[a-z]{2,3}(_[A-Z]{2})?$", error="Must look like en or en_US.")
    )


class WhatsAppProvider(Provider):
    secret_fields = ("access_token",)

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
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
        response = self._request(config, "POST", f"{config['phone_number_id']}/messages", json=payload)
        messages = _json(response).get("messages")
        if not (isinstance(messages, list) and messages and isinstance(messages[0], dict)):
            raise DeliveryError(PROVIDER_ERROR, "WhatsApp Cloud API answered 200 without a message id")

    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        number = _json(
            self._request(
                config, "GET", config["phone_number_id"], params={"fields": "display_phone_number,verified_name"}
            )
        )
        listed = _json(self._request(config, "GET", f"{config['business_account_id']}/phone_numbers")).get("data")
        ids = (
            {str(entry.get("id")) for entry in listed if isinstance(entry, dict)} if isinstance(listed, list) else set()
        )
        if config["phone_number_id"] not in ids:
            raise DeliveryError(SENDER_REJECTED, "phone_number_id is not listed by the WhatsApp Business Account")
        return {key: str(number[key])[:100] for key in ("display_phone_number", "verified_name") if number.get(key)}

    def _request(self, config: dict[str, Any], method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx  # the web process never sends: the client library is loaded where it is used

        url = f"{self.settings.whatsapp_base_url}/{config['api_version']}/{path}"
        headers = {"Authorization": f"Bearer {config['access_token']}"}
        try:
            response = _thread_client().request(method, url, headers=headers, timeout=self.settings.timeout, **kwargs)
        except httpx.TimeoutException:
            raise DeliveryError(PROVIDER_UNREACHABLE, "WhatsApp Cloud API did not answer in time") from None
        except httpx.HTTPError:
            raise DeliveryError(PROVIDER_UNREACHABLE, "cannot reach the WhatsApp Cloud API") from None
        except httpx.InvalidURL:
            raise DeliveryError(CONFIG_INVALID, "the config does not form a valid Graph API URL") from None
        if response.status_code != 200:
            raise self._map(response)
        return response

    @staticmethod
    def _map(response: httpx.Response) -> DeliveryError:
        error = _json(response).get("error")
        error = error if isinstance(error, dict) else {}
        code = error.get("code") if isinstance(error.get("code"), int) else 0
        text = str(error.get("message") or "")
        detail = f"WhatsApp {response.status_code}" + (f" (error {code})" if code else "")
        if response.status_code == 401 or code in AUTH_CODES or 200 <= code < 300:
            return DeliveryError(AUTH_FAILED, f"WhatsApp rejected the access token: {detail}", reply=text)
        if code == 131047:
            return DeliveryError(
                DESTINATION_REJECTED,
                f"WhatsApp: outside the 24-hour window a template is required; set template_name ({detail})",
            )
        if code in RECIPIENT_CODES:
            return DeliveryError(DESTINATION_REJECTED, f"WhatsApp rejected the recipient: {detail}", reply=text)
        return DeliveryError(PROVIDER_ERROR, f"WhatsApp failed: {detail}", _retry_after(response), reply=text)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if response.status_code == 200:
            raise DeliveryError(PROVIDER_ERROR, "WhatsApp Cloud API sent an answer that could not be read")
        return {}
    return body


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
    return seconds if response.status_code == 429 and 0 <= seconds <= 86400 else None


# One HTTP client (and its connection pool) per worker thread, kept between sends as httpx intends: a new client
# per request cost a TCP and TLS handshake each time.
_per_thread = threading.local()


def _thread_client() -> httpx.Client:
    client = getattr(_per_thread, "client", None)
    if client is None:
        import httpx

        client = _per_thread.client = httpx.Client(
            follow_redirects=False, verify=tls_context(), cookies=cookieless_jar()
        )
    return client


CHANNEL = ChannelType(
    name="whatsapp",
    config_schema=WhatsAppConfig,
    provider=WhatsAppProvider,
    recipient_field="phone",
    normalize=e164,
    mask=mask_phone,
    # The Cloud API takes a text body of at most 4,096 characters.
    max_text=4096,
)
