"""SMS through Twilio's Messages API with an API key (or the account's auth token)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from marshmallow import RAISE, Schema, fields, validate

from app.channels.base import ChannelType, DeliveryError, Exchange, OutgoingMessage, Provider
from app.channels.http import failure, fetch, run_within
from app.fields import E164, FullMatch, credential, e164
from app.outcomes import (
    AUTH_FAILED,
    CONFIG_INVALID,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    SENDER_REJECTED,
)

T = TypeVar("T")

# Twilio error codes that mean "this recipient", not "this account":
# invalid To, unsubscribed, not SMS-capable, unverified trial recipient, blocked region, landline.
RECIPIENT_CODES = {21211, 21408, 21610, 21612, 21614, 21608, 21265, 21266}
ACCOUNT_CODES = {20003, 20005, 20008, 20403}
# The From number is not one of the account's: not owned, not SMS-capable, not a valid sender.
SENDER_CODES = {21606, 21659, 21660, 21212}
TWILIO_API = "https://api.twilio.com"


class SmsConfig(Schema):
    class Meta:
        unknown = RAISE

    provider = fields.String(required=True, validate=validate.Equal("twilio"))
    api_key_sid = fields.String(
        required=True,
        validate=FullMatch(r"^(SK|AC)[0-9a-fA-F]{32}$", error="Must be a Twilio SID: SK or AC and 32 hex."),
    )
    api_key_secret = credential(256)
    account_sid = fields.String(
        validate=FullMatch(r"^AC[0-9a-fA-F]{32}$", error="Must be a Twilio account SID: AC and 32 hex.")
    )
    from_number = E164(required=True)
    # The account's Auth Token: with it, Twilio's signed status callbacks can be checked (receipts).
    auth_token = credential(256, required=False)


def receipt_key(config: dict[str, Any]) -> str | None:
    """What signs Twilio's status callbacks for this account: its Auth Token (given, or the secret of an `AC`
    SID used as the key); None when only an API key is known, which cannot check them."""
    if config.get("auth_token"):
        return str(config["auth_token"])
    return str(config["api_key_secret"]) if str(config["api_key_sid"]).startswith("AC") else None


def mask_phone(number: str) -> str:
    return number[:3] + "*" * max(len(number) - 5, 0) + number[-2:]


class TwilioSmsProvider(Provider):
    secret_fields = ("api_key_secret", "auth_token")

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> str | None:
        from twilio.base import values

        client, exchange = self._client(config)
        callback = message.status_callback or values.unset
        sent = self._call(
            exchange,
            lambda: client.messages.create_async(
                to=destination, from_=config["from_number"], body=message.text, status_callback=callback
            ),
        )
        sid = getattr(sent, "sid", None)
        return str(sid)[:128] if sid else None

    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        client, exchange = self._client(config)

        async def check() -> tuple[Any, list[Any]]:
            account = await client.api.v2010.accounts(client.account_sid).fetch_async()
            numbers = await client.incoming_phone_numbers.list_async(phone_number=config["from_number"], limit=20)
            return account, numbers

        account, numbers = self._call(exchange, check)
        if not any(getattr(number, "phone_number", None) == config["from_number"] for number in numbers):
            raise DeliveryError(SENDER_REJECTED, "from_number is not one of the Twilio account's phone numbers")
        details = {"from_number": config["from_number"]}
        if getattr(account, "friendly_name", None):
            details["account"] = str(account.friendly_name)[:100]
        return details

    def _client(self, config: dict[str, Any]) -> tuple[Any, Exchange]:
        # The web process never sends: the client library is loaded where it is used.
        from twilio.rest import Client

        key_sid = config["api_key_sid"]
        account_sid = config.get("account_sid") or (key_sid if key_sid.startswith("AC") else None)
        if account_sid is None:
            raise DeliveryError(CONFIG_INVALID, "Twilio needs account_sid (AC...) alongside an API key SID (SK...)")
        exchange = Exchange()
        client = Client(
            username=key_sid,
            password=config["api_key_secret"],
            account_sid=account_sid,
            http_client=_http_client_class()(self.settings.twilio_base_url, self.settings.timeout, exchange),
            environment={},  # TWILIO_EDGE / TWILIO_REGION must not reroute the configured base URL
        )
        return client, exchange

    def _call(self, exchange: Exchange, call: Callable[[], Awaitable[T]]) -> T:
        """`call` within the one deadline of this provider call; every failure a DeliveryError."""
        from twilio.base.exceptions import TwilioRestException

        try:
            return run_within(self.settings.timeout, call)
        except TwilioRestException as exc:
            raise self._map(exc) from None
        except Exception as exc:  # HTTP's own, or a body the client library could not parse
            raise failure(exc, exchange, "Twilio", self.settings.timeout) from None

    @staticmethod
    def _map(exc: Any) -> DeliveryError:
        code = exc.code if isinstance(exc.code, int) else None
        detail = f"Twilio {exc.status}" + (f" (error {code})" if code else "")
        text = str(exc.msg or "")
        if exc.status in (401, 403) or code in ACCOUNT_CODES:
            return DeliveryError(AUTH_FAILED, f"Twilio rejected the credentials: {detail}", reply=text)
        if code in SENDER_CODES:
            return DeliveryError(SENDER_REJECTED, f"Twilio rejected the sender: {detail}", reply=text)
        if code in RECIPIENT_CODES or (exc.status == 400 and code and 21200 <= code < 21700):
            return DeliveryError(DESTINATION_REJECTED, f"Twilio rejected the recipient: {detail}", reply=text)
        if exc.status == 404:
            return DeliveryError(AUTH_FAILED, f"Twilio does not know this account: {detail}")
        return DeliveryError(PROVIDER_ERROR, f"Twilio failed: {detail}", reply=text)


@functools.cache
def _http_client_class() -> type:
    """The SDK's documented extension point for how requests go out, built on the thread's HTTP client (one
    connection pool per worker thread, one deadline per call, a capped answer) and sending to
    TWILIO_API_BASE_URL (staging, a test peer) where the SDK addresses https://api.twilio.com."""
    from twilio.http import AsyncHttpClient
    from twilio.http.response import Response

    class HttpClient(AsyncHttpClient):
        def __init__(self, base_url: str, timeout: float, exchange: Exchange) -> None:
            super().__init__(logger=logging.getLogger("twilio.http_client"), is_async=True, timeout=timeout)
            self.base_url, self.exchange = base_url, exchange

        async def request(
            self,
            method: str,
            uri: str,
            params: dict[str, object] | None = None,
            data: dict[str, object] | None = None,
            headers: dict[str, str] | None = None,
            auth: tuple[str, str] | None = None,
            timeout: float | None = None,
            allow_redirects: bool = False,
        ) -> Response:
            if uri.startswith(TWILIO_API):
                uri = self.base_url + uri[len(TWILIO_API) :]
            answer = await fetch(
                self.exchange, method, uri, params=params, data=data, headers=headers, auth=auth,
                timeout=timeout or self.timeout,
            )  # fmt: skip
            return Response(answer.status, answer.body.decode("utf-8", "replace"), answer.headers)

    return HttpClient


CHANNEL = ChannelType(
    name="sms",
    config_schema=SmsConfig,
    provider=TwilioSmsProvider,
    recipient_field="phone",
    normalize=e164,
    mask=mask_phone,
    receipt_key=receipt_key,
    receipts_route="twilio",
    # Twilio's Messages API refuses a Body over 1,600 characters.
    max_text=1600,
)
