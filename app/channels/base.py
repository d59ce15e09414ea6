"""What every connector type is made of: a config schema, a destination rule and mask, a provider, a queue.

Providers know nothing of Flask or the database: they get a decrypted config, a destination and the
settings they need, make one network exchange, and either return or raise `DeliveryError` with one of the
codes of `app.outcomes`.
"""

from __future__ import annotations

import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any, ClassVar

from marshmallow import Schema


class DeliveryError(Exception):
    """A failed provider exchange: one code of `app.outcomes`, the service's own words, and the provider's.

    `message` is ours and never holds a secret; `reply` is what the provider said, which may quote anything it
    was sent (a password, a token), so it is scrubbed, or withheld, before anyone sees it. `maybe_sent`: the
    request reached the provider and no refusal came back (a timeout, a cut connection, an unreadable success),
    so the provider may have accepted the message: it must never be sent again through this connector.
    """

    def __init__(
        self,
        code: str,
        message: str,
        retry_after: float | None = None,
        *,
        reply: str | None = None,
        maybe_sent: bool = False,
    ) -> None:
        super().__init__(f"{message}: {reply}" if reply else message)
        self.code = code
        self.message = message
        self.reply = reply or None
        self.retry_after = retry_after  # seconds the provider asked us to wait (a 429's hint), if any
        self.maybe_sent = maybe_sent


@dataclass
class Exchange:
    """How far one provider call got: whether a request went out, and whether the provider refused it."""

    request_out: bool = False  # the request started going out: the provider may have acted on it
    refused: bool = False  # an error answer came back (HTTP 4xx or 5xx, an SMTP error reply): it did not
    statuses: list[int] = field(default_factory=list)  # the HTTP statuses answered, in order

    @property
    def maybe_sent(self) -> bool:
        """Whether the provider may have accepted what was asked: a request went out and nothing refused it."""
        return self.request_out and not self.refused


@dataclass(frozen=True)
class OutgoingMessage:
    subject: str
    text: str
    html: str | None = None
    # Where the provider may report what became of it (Twilio's StatusCallback), when the service has a public
    # address and the connector can check the reports' signatures.
    status_callback: str | None = None


@dataclass(frozen=True)
class ProviderSettings:
    timeout: float
    allow_private: bool = False
    twilio_base_url: str = "https://api.twilio.com"
    whatsapp_base_url: str = "https://graph.facebook.com"
    telegram_base_url: str = "https://api.telegram.org"


class Provider(ABC):
    # Config fields whose values must never leave the worker; scrubbed from every message and log line.
    secret_fields: ClassVar[tuple[str, ...]]

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings

    def secrets(self, config: dict[str, Any]) -> list[str]:
        return [str(config[name]) for name in self.secret_fields if config.get(name)]

    @abstractmethod
    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> str | None:
        """Send one message and return the provider's id of it (what its receipts name), or raise
        DeliveryError."""

    @abstractmethod
    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        """Prove the credentials and the sender without delivering anything; return public facts a Host
        would recognise, or raise DeliveryError."""


def text_length(text: str) -> int:
    """Characters as providers count them: UTF-16 code units (an emoji outside the BMP counts two)."""
    return len(text.encode("utf-16-le")) // 2


@dataclass(frozen=True)
class ChannelType:
    """Everything about one connector type, in the one module that defines it."""

    name: str  # the connector's `type`, and its queue
    config_schema: type[Schema]
    provider: type[Provider]
    recipient_field: str  # the field of a dispatch's `recipient` this type can reach
    normalize: Callable[[str], str]  # a destination as given -> its canonical form, or ValidationError
    mask: Callable[[str], str]  # a destination -> enough to recognise it, not enough to harvest it
    # A valid config -> the fields this deployment refuses, with why (config, ALLOW_PRIVATE_DESTINATIONS).
    refused_fields: Callable[[dict[str, Any], bool], dict[str, list[str]]] = lambda _config, _allow_private: {}
    # A valid config -> the secret that signs its provider's receipts (a Twilio Auth Token, a Meta app
    # secret), or None: the connector cannot report receipts, its provider's acceptance is all there is.
    receipt_key: Callable[[dict[str, Any]], str | None] = lambda _config: None
    # The name of its provider's receipts under /api/webhooks/<name>/<connector id>, when it sends any.
    receipts_route: str | None = None

    def callback_url(self, public_base_url: str | None, connector_id: Any, config: dict[str, Any]) -> str | None:
        """Where its provider reports on this connector's messages, when the service has a public address and
        the connector can check the reports' signatures."""
        if not (public_base_url and self.receipts_route and self.receipt_key(config)):
            return None
        return f"{public_base_url}/api/webhooks/{self.receipts_route}/{connector_id}"
    # The longest text the provider takes, in UTF-16 code units (how Twilio and Telegram count); None: no limit
    # below the API's own.
    max_text: int | None = None

    def takes(self, text: str) -> bool:
        """Whether the provider takes a text this long."""
        return self.max_text is None or text_length(text) <= self.max_text

    @property
    def queue(self) -> str:
        return self.name


_tls: ssl.SSLContext | None = None
_tls_lock = threading.Lock()


def tls_context() -> ssl.SSLContext:
    """One per process: loading the trust store costs ~20 ms of CPU and ~0.9 MiB, too much for every send.

    Verifies against the system trust store, or SSL_CERT_FILE / SSL_CERT_DIR as set when first used. The
    lock matters: a pool's threads start their first jobs together, and without it each built its own
    context (the load releases the GIL) and kept it in its HTTP client.
    """
    global _tls
    with _tls_lock:
        if _tls is None:
            _tls = ssl.create_default_context()
        return _tls


# A kept HTTP client serves every Host's connectors: no cookie set by an answer to one Host's request may ride
# along on another's, so the clients' jars keep none.
KEEP_NO_COOKIES = DefaultCookiePolicy(allowed_domains=[])


def cookieless_jar() -> CookieJar:
    return CookieJar(policy=KEEP_NO_COOKIES)
