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
UNDELIVERED = "undelivered"  # a provider's receipt said an accepted message did not reach the recipient

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
    UNDELIVERED,
)

# Failures the provider or the Host's settings caused (a test's or check's 502), as against our own.
PROVIDER_CAUSED = frozenset(
    {AUTH_FAILED, SENDER_REJECTED, DESTINATION_REJECTED, DESTINATION_BLOCKED, PROVIDER_UNREACHABLE, PROVIDER_ERROR,
     CONFIG_INVALID}
)  # fmt: skip
# is_verified means "this connector works". These say it does not, whatever the attempt: they clear it.
BROKEN = frozenset({AUTH_FAILED, SENDER_REJECTED, CONFIG_INVALID, DESTINATION_BLOCKED})
# These may be a provider's bad minute: they clear it only from a test or check, which exist to judge the
# connector (the daily re-check judges the rest); one 429 or 5xx during a dispatch does not. A refused recipient
# (a survivor's mistyped number) says nothing of the connector and never clears it.
BROKEN_WHEN_PROBED = frozenset({PROVIDER_UNREACHABLE, PROVIDER_ERROR})
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
    provider_message_id: str | None = None  # what the provider calls the message it accepted

    def verdict(self, probe: bool) -> bool | None:
        """What it says of the connector: works (True), is broken (False), or nothing (None: is_verified stays).
        `probe`: it came from a test or check, rather than a dispatch attempt."""
        if self.success:
            return True
        if self.error_code in BROKEN or (probe and self.error_code in BROKEN_WHEN_PROBED):
            return False
        return None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
