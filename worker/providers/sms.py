"""SMS through Twilio's Messages API with an API key (or the account's auth token)."""

from __future__ import annotations

from typing import Any

import requests
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from worker.providers.base import (
    AUTH_FAILED,
    CONFIG_INVALID,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    PROVIDER_UNREACHABLE,
    DeliveryError,
    OutgoingMessage,
    Provider,
)

# Twilio error codes that mean "this recipient", not "this account":
# invalid To, unsubscribed, not SMS-capable, unverified trial recipient, blocked region, landline.
RECIPIENT_CODES = {21211, 21408, 21610, 21612, 21614, 21608, 21606, 21265, 21266}
ACCOUNT_CODES = {20003, 20005, 20008, 20403}


class TwilioSmsProvider(Provider):
    type = "sms"
    secret_fields = ("api_key_secret",)

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
        key_sid = config["api_key_sid"]
        account_sid = config.get("account_sid") or (key_sid if key_sid.startswith("AC") else None)
        if account_sid is None:
            raise DeliveryError(CONFIG_INVALID, "Twilio needs account_sid (AC...) alongside an API key SID (SK...)")
        client = Client(
            username=key_sid,
            password=config["api_key_secret"],
            account_sid=account_sid,
            http_client=TwilioHttpClient(timeout=self.settings.timeout, pool_connections=False),
            environment={},  # TWILIO_EDGE / TWILIO_REGION must not reroute the configured base URL
        )
        client.api.base_url = self.settings.twilio_base_url
        try:
            client.messages.create(to=destination, from_=config["from_number"], body=message.text)
        except TwilioRestException as exc:
            raise self._map(exc) from None
        except requests.Timeout:
            raise DeliveryError(PROVIDER_UNREACHABLE, "Twilio did not answer in time") from None
        except requests.RequestException:
            raise DeliveryError(PROVIDER_UNREACHABLE, "cannot reach Twilio") from None
        except Exception:  # TwilioException, or a body the client library could not parse
            raise DeliveryError(PROVIDER_ERROR, "Twilio sent an answer that could not be read") from None

    @staticmethod
    def _map(exc: TwilioRestException) -> DeliveryError:
        code = exc.code if isinstance(exc.code, int) else None
        detail = f"Twilio {exc.status}" + (f" (error {code})" if code else "")
        text = str(exc.msg or "")
        if exc.status in (401, 403) or code in ACCOUNT_CODES:
            return DeliveryError(AUTH_FAILED, f"Twilio rejected the credentials: {detail} {text}".strip())
        if code in RECIPIENT_CODES or (exc.status == 400 and code and 21200 <= code < 21700):
            return DeliveryError(DESTINATION_REJECTED, f"Twilio rejected the recipient: {detail} {text}".strip())
        if exc.status == 404:
            return DeliveryError(AUTH_FAILED, f"Twilio does not know this account: {detail}")
        return DeliveryError(PROVIDER_ERROR, f"Twilio failed: {detail} {text}".strip())
