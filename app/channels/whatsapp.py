"""WhatsApp Cloud API: POST {base}/{api_version}/{phone_number_id}/messages with a bearer token.

Outside the 24-hour customer-service window Meta accepts only templates; `template_name` in the config
sends that template instead of free text.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from marshmallow import RAISE, Schema, fields, validate

from app.channels.base import ChannelType, DeliveryError, Exchange, OutgoingMessage, Provider, ProviderSettings
from app.channels.http import Answer, failure, fetch, run_within
from app.channels.sms import mask_phone
from app.fields import FullMatch, credential, e164
from app.outcomes import (
    AUTH_FAILED,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    SENDER_REJECTED,
)

T = TypeVar("T")
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
    # The Meta app's secret, which signs its webhook calls (receipts), and the token its webhook handshake
    # must present: both optional, both write-only and sealed.
    app_secret = credential(256, required=False)
    webhook_verify_token = credential(256, required=False)


def receipt_key(config: dict[str, Any]) -> str | None:
    """What signs Meta's webhook calls for this number: the app secret, when it is set."""
    return str(config["app_secret"]) if config.get("app_secret") else None


class WhatsAppProvider(Provider):
    secret_fields = ("access_token", "app_secret", "webhook_verify_token")

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> str | None:
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

        async def post(session: _Session) -> str | None:
            answer = await session.request("POST", f"{config['phone_number_id']}/messages", json=payload)
            messages = _json(answer).get("messages")
            if not (isinstance(messages, list) and messages and isinstance(messages[0], dict)):
                raise DeliveryError(
                    PROVIDER_ERROR, "WhatsApp Cloud API answered 200 without a message id", maybe_sent=True
                )
            wamid = messages[0].get("id")
            return str(wamid)[:128] if isinstance(wamid, str) and wamid else None

        return self._run(config, post)

    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        async def check(session: _Session) -> dict[str, str]:
            fields = {"fields": "display_phone_number,verified_name"}
            number = _json(await session.request("GET", config["phone_number_id"], params=fields))
            listed = _json(await session.request("GET", f"{config['business_account_id']}/phone_numbers")).get("data")
            ids = {str(e.get("id")) for e in listed if isinstance(e, dict)} if isinstance(listed, list) else set()
            if config["phone_number_id"] not in ids:
                raise DeliveryError(SENDER_REJECTED, "phone_number_id is not listed by the WhatsApp Business Account")
            return {key: str(number[key])[:100] for key in ("display_phone_number", "verified_name") if number.get(key)}

        return self._run(config, check)

    def _run(self, config: dict[str, Any], work: Callable[[_Session], Awaitable[T]]) -> T:
        """`work` with a session of Graph API requests, within the one deadline of this call."""
        session = _Session(self.settings, config)
        try:
            return run_within(self.settings.timeout, lambda: work(session))
        except DeliveryError:
            raise
        except Exception as exc:
            raise failure(exc, session.exchange, "the WhatsApp Cloud API", self.settings.timeout) from None


class _Session:
    """The Graph API requests of one call, with what they got as far as."""

    def __init__(self, settings: ProviderSettings, config: dict[str, Any]) -> None:
        self.base = f"{settings.whatsapp_base_url}/{config['api_version']}"
        self.headers = {"Authorization": f"Bearer {config['access_token']}"}
        self.timeout = settings.timeout
        self.exchange = Exchange()

    async def request(self, method: str, path: str, **kwargs: Any) -> Answer:
        answer = await fetch(
            self.exchange, method, f"{self.base}/{path}", headers=self.headers, timeout=self.timeout, **kwargs
        )
        if answer.status != 200:
            raise _map(answer)
        return answer


def _map(answer: Answer) -> DeliveryError:
    error = _json(answer).get("error")
    error = error if isinstance(error, dict) else {}
    code = error.get("code") if isinstance(error.get("code"), int) else 0
    text = str(error.get("message") or "")
    detail = f"WhatsApp {answer.status}" + (f" (error {code})" if code else "")
    if answer.status == 401 or code in AUTH_CODES or 200 <= code < 300:
        return DeliveryError(AUTH_FAILED, f"WhatsApp rejected the access token: {detail}", reply=text)
    if code == 131047:
        return DeliveryError(
            DESTINATION_REJECTED,
            f"WhatsApp: outside the 24-hour window a template is required; set template_name ({detail})",
        )
    if code in RECIPIENT_CODES:
        return DeliveryError(DESTINATION_REJECTED, f"WhatsApp rejected the recipient: {detail}", reply=text)
    # A 2xx other than 200 is no answer the API gives: the message may have gone.
    maybe_sent = 200 <= answer.status < 300
    return DeliveryError(
        PROVIDER_ERROR, f"WhatsApp failed: {detail}", _retry_after(answer), reply=text, maybe_sent=maybe_sent
    )


def _json(answer: Answer) -> dict[str, Any]:
    try:
        body = json.loads(answer.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if answer.status == 200:  # accepted, perhaps: what it said cannot be read
            raise DeliveryError(
                PROVIDER_ERROR, "WhatsApp Cloud API sent an answer that could not be read", maybe_sent=True
            )
        return {}
    return body


def _retry_after(answer: Answer) -> float | None:
    try:
        seconds = float(answer.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
    return seconds if answer.status == 429 and 0 <= seconds <= 86400 else None


CHANNEL = ChannelType(
    name="whatsapp",
    config_schema=WhatsAppConfig,
    provider=WhatsAppProvider,
    recipient_field="phone",
    normalize=e164,
    mask=mask_phone,
    receipt_key=receipt_key,
    receipts_route="whatsapp",
    # The Cloud API takes a text body of at most 4,096 characters.
    max_text=4096,
)
