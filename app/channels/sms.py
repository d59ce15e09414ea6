"""SMS through Twilio's Messages API with an API key (or the account's auth token)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from marshmallow import RAISE, Schema, fields, validate

from app.channels.base import KEEP_NO_COOKIES, ChannelType, DeliveryError, OutgoingMessage, Provider
from app.fields import E164, FullMatch, credential, e164
from app.outcomes import (
    AUTH_FAILED,
    CONFIG_INVALID,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    PROVIDER_UNREACHABLE,
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


def mask_phone(number: str) -> str:
    return number[:3] + "*" * max(len(number) - 5, 0) + number[-2:]


class TwilioSmsProvider(Provider):
    secret_fields = ("api_key_secret",)

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
        client = self._client(config)
        self._call(lambda: client.messages.create(to=destination, from_=config["from_number"], body=message.text))

    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        client = self._client(config)
        account = self._call(lambda: client.api.v2010.accounts(client.account_sid).fetch())
        numbers = self._call(lambda: client.incoming_phone_numbers.list(phone_number=config["from_number"], limit=20))
        if not any(getattr(number, "phone_number", None) == config["from_number"] for number in numbers):
            raise DeliveryError(SENDER_REJECTED, "from_number is not one of the Twilio account's phone numbers")
        details = {"from_number": config["from_number"]}
        if getattr(account, "friendly_name", None):
            details["account"] = str(account.friendly_name)[:100]
        return details

    def _client(self, config: dict[str, Any]) -> Any:
        # The web process never sends: the client library is loaded where it is used.
        from twilio.rest import Client

        key_sid = config["api_key_sid"]
        account_sid = config.get("account_sid") or (key_sid if key_sid.startswith("AC") else None)
        if account_sid is None:
            raise DeliveryError(CONFIG_INVALID, "Twilio needs account_sid (AC...) alongside an API key SID (SK...)")
        http = _thread_http_client()
        http.timeout, http.base_url = self.settings.timeout, self.settings.twilio_base_url
        return Client(
            username=key_sid,
            password=config["api_key_secret"],
            account_sid=account_sid,
            http_client=http,
            environment={},  # TWILIO_EDGE / TWILIO_REGION must not reroute the configured base URL
        )

    def _call(self, call: Callable[[], T]) -> T:
        import requests
        from twilio.base.exceptions import TwilioRestException

        try:
            return call()
        except TwilioRestException as exc:
            raise self._map(exc) from None
        except requests.Timeout:
            raise DeliveryError(PROVIDER_UNREACHABLE, "Twilio did not answer in time") from None
        except requests.RequestException:
            raise DeliveryError(PROVIDER_UNREACHABLE, "cannot reach Twilio") from None
        except Exception:  # TwilioException, or a body the client library could not parse
            raise DeliveryError(PROVIDER_ERROR, "Twilio sent an answer that could not be read") from None

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


# One Twilio HTTP client (a requests session and its connection pool) per worker thread, kept between sends as
# the SDK intends: a new one per send cost a TCP and TLS handshake each time. requests' sessions are not safe to
# share between threads.
_per_thread = threading.local()


def _thread_http_client() -> Any:
    http = getattr(_per_thread, "http", None)
    if http is None:
        from twilio.http.http_client import TwilioHttpClient

        class BaseUrlHttpClient(TwilioHttpClient):
            """The SDK's HTTP client, sending to TWILIO_API_BASE_URL (staging, a test peer) where the SDK
            addresses https://api.twilio.com: the SDK's documented way to change how requests go out."""

            base_url = TWILIO_API

            def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
                if url.startswith(TWILIO_API):
                    url = self.base_url + url[len(TWILIO_API) :]
                return super().request(method, url, *args, **kwargs)

        http = _per_thread.http = BaseUrlHttpClient(pool_connections=True)
        http.session.cookies.set_policy(KEEP_NO_COOKIES)
    return http


CHANNEL = ChannelType(
    name="sms",
    config_schema=SmsConfig,
    provider=TwilioSmsProvider,
    recipient_field="phone",
    normalize=e164,
    mask=mask_phone,
    # Twilio's Messages API refuses a Body over 1,600 characters.
    max_text=1600,
)
