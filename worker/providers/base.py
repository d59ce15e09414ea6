"""One interface for every provider, one small set of errors, and the network guard.

Providers know nothing of Flask or the database: they get a decrypted config, a destination and the
settings they need, send one message, and either return or raise `DeliveryError`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote

# The documented error codes (README, "Test delivery errors").
AUTH_FAILED = "auth_failed"  # the provider refused the credentials
DESTINATION_REJECTED = "destination_rejected"  # the provider refused the recipient
DESTINATION_BLOCKED = "destination_blocked"  # the host resolves to an address we refuse to reach
PROVIDER_UNREACHABLE = "provider_unreachable"  # no connection, TLS failure, or no answer in time
PROVIDER_ERROR = "provider_error"  # the provider failed (5xx, 429, malformed answer)
CONFIG_INVALID = "config_invalid"  # the stored config cannot be used (e.g. Twilio API key without account SID)
TIMEOUT = "timeout"  # ours: no worker finished the job in time
BROKER_UNAVAILABLE = "broker_unavailable"  # ours: the job could not be queued
WORKER_ERROR = "worker_error"  # ours: the worker failed unexpectedly

# Failures that say the channel itself does not work: they clear is_verified.
PROVIDER_CAUSED = {
    AUTH_FAILED,
    DESTINATION_REJECTED,
    DESTINATION_BLOCKED,
    PROVIDER_UNREACHABLE,
    PROVIDER_ERROR,
    CONFIG_INVALID,
}

REDACTED = "[redacted]"


class DeliveryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class OutgoingMessage:
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class ProviderSettings:
    timeout: float
    allow_private: bool = False
    twilio_base_url: str = "https://api.twilio.com"
    whatsapp_base_url: str = "https://graph.facebook.com"
    telegram_base_url: str = "https://api.telegram.org"


class Provider(ABC):
    type: ClassVar[str]
    # Config fields whose values must never leave the worker; scrubbed from every error message.
    secret_fields: ClassVar[tuple[str, ...]]

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings

    def secrets(self, config: dict[str, Any]) -> list[str]:
        return [str(config[field]) for field in self.secret_fields if config.get(field)]

    @abstractmethod
    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
        """Send one message or raise DeliveryError."""


_tls: ssl.SSLContext | None = None
_tls_lock = threading.Lock()


def tls_context() -> ssl.SSLContext:
    """One per process: loading the trust store costs ~20 ms of CPU and ~0.9 MiB, too much for every send.

    Verifies against the system trust store, or SSL_CERT_FILE / SSL_CERT_DIR as set when first used. The
    lock matters: a pool's threads start their first jobs together, and without it each built its own
    context (the load releases the GIL) and kept it in its HTTP client, ~45 MiB for 50 threads.
    """
    global _tls
    with _tls_lock:
        if _tls is None:
            _tls = ssl.create_default_context()
        return _tls


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Remove every secret (and its URL-encoded form) from a message built from a provider's answer."""
    for secret in secrets:
        if not secret:
            continue
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            # Case-insensitive: some client libraries re-case the provider's error text.
            text = re.sub(re.escape(form), REDACTED, text, flags=re.IGNORECASE)
    return text


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local (cloud metadata too), multicast, reserved, unspecified."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:
            return False
        # IPv6 forms that carry an IPv4 address are judged by that address.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def literal_host_blocked(host: str) -> bool:
    """True when `host` is itself a refused address or a name that always means this machine."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return not is_public_address(name)


def resolve_checked(host: str, port: int, allow_private: bool) -> list[tuple[int, str]]:
    """Resolve once and return (family, address) pairs that may be connected to.

    The caller connects to these addresses, not to the name, so a second DNS answer cannot swap in a
    refused address after the check.
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DeliveryError(PROVIDER_UNREACHABLE, f"cannot resolve host {host!r}") from None
    allowed: list[tuple[int, str]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if (allow_private or is_public_address(address)) and (family, address) not in allowed:
            allowed.append((family, address))
    if not allowed:
        # Same words whether or not anything listens there: the answer must not map the network.
        raise DeliveryError(DESTINATION_BLOCKED, f"host {host!r} resolves to an address that is not allowed")
    return allowed


def connect_checked(host: str, port: int, timeout: float, allow_private: bool) -> socket.socket:
    last_error: OSError | None = None
    for family, address in resolve_checked(host, port, allow_private):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    assert last_error is not None
    raise last_error
