"""What a delivery, a check or a dispatch attempt can come to: the error codes and the outcome.

The codes are the service's vocabulary (README, "Delivery errors"); providers raise them, services record
them, and the API answers with them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Caused by the provider or the Host's settings: they say the channel does not work.
AUTH_FAILED = "auth_failed"  # the provider refused the credentials
SENDER_REJECTED = "sender_rejected"  # the provider does not let these credentials send as the configured sender
DESTINATION_REJECTED = "destination_rejected"  # the provider refused the recipient
DESTINATION_BLOCKED = "destination_blocked"  # the host resolves to an address the service refuses to reach
PROVIDER_UNREACHABLE = "provider_unreachable"  # no connection, TLS failure, or no answer in time
PROVIDER_ERROR = "provider_error"  # the provider failed (5xx, 429, unreadable answer)
CONFIG_INVALID = "config_invalid"  # the stored config cannot work (e.g. a Twilio API key without account SID)
# Ours: they say nothing about the channel.
TIMEOUT = "timeout"  # no worker finished the job in time
BROKER_UNAVAILABLE = "broker_unavailable"  # the job could not be queued
WORKER_ERROR = "worker_error"  # the worker failed unexpectedly
UNKNOWN = "unknown"  # the worker stopped during the provider call: the message may or may not have gone

ERROR_CODES = (
    AUTH_FAILED,
    SENDER_REJECTED,
    DESTINATION_REJECTED,
    DESTINATION_BLOCKED,
    PROVIDER_UNREACHABLE,
    PROVIDER_ERROR,
    CONFIG_INVALID,
    TIMEOUT,
    BROKER_UNAVAILABLE,
    WORKER_ERROR,
    UNKNOWN,
)

# Failures that say the channel itself does not work: they clear is_verified.
PROVIDER_CAUSED = frozenset(
    {AUTH_FAILED, SENDER_REJECTED, DESTINATION_REJECTED, DESTINATION_BLOCKED, PROVIDER_UNREACHABLE, PROVIDER_ERROR,
     CONFIG_INVALID}
)  # fmt: skip
# Failures that trying again cannot mend: dispatch takes the connector out of the message's later rounds.
PERMANENT = frozenset({AUTH_FAILED, SENDER_REJECTED, DESTINATION_REJECTED, DESTINATION_BLOCKED, CONFIG_INVALID})


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to; also a Celery result value, so it holds no secret."""

    success: bool
    message: str
    delivery_time_ms: int | None = None
    error_code: str | None = None
    details: dict[str, str] | None = None  # a check's public facts (the bot's @username, the SMTP greeting)
    retry_after: float | None = None  # seconds the provider asked us to wait (a 429's Retry-After), if any

    @property
    def is_verdict(self) -> bool:
        """Whether it says something of the channel: a success, or a failure the provider or settings caused
        (our own failures leave is_verified be)."""
        return self.success or self.error_code in PROVIDER_CAUSED

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
