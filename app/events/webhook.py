"""POST one event to EVENTS_WEBHOOK_URL, signed as the Standard Webhooks specification says.

Each worker thread posts through its kept HTTP client (`app.channels.http`): one connection to the receiver
serves event after event, where a client per event paid a new trust store, a TCP (and TLS) handshake each
time. The client follows no redirect and keeps no cookie, and verifies TLS against the system trust store
(or SSL_CERT_FILE).
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING

from app.channels.base import Exchange
from app.channels.http import MAX_ANSWER_BYTES, AnswerTooLarge, fetch, run_within

if TYPE_CHECKING:
    from standardwebhooks import Webhook


@lru_cache(maxsize=4)
def _signer(secret: str) -> Webhook:
    # The web process never posts: the library is loaded where it is used.
    from standardwebhooks import Webhook

    return Webhook(secret)


def post_event(
    url: str, secret: str, event_id: int, payload: str, timeout: float, sent_at: datetime | None = None
) -> str | None:
    """None when the receiver took it (2xx); otherwise a short reason, without the receiver's body.

    `timeout` bounds the whole exchange (name resolution, connection, request and answer), so a post never
    outlasts the lease of the event it carries."""
    import httpx

    # The timestamp the receiver checks against its clock is the database's (naive UTC), not this process's.
    msg_id = f"evt_{event_id}"
    now = sent_at.replace(tzinfo=UTC) if sent_at is not None else datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": _signer(secret).sign(msg_id, now, payload),
    }
    exchange = Exchange()
    try:
        answer = run_within(
            timeout,
            lambda: fetch(exchange, "POST", url, timeout=timeout, content=payload.encode(), headers=headers),
        )
        status = answer.status
    except TimeoutError:
        return f"the receiver did not answer within {timeout:g} s"
    except AnswerTooLarge:
        # The status came first: a receiver that took the event and then talked on has still taken it.
        status = exchange.statuses[-1]
        if not 200 <= status < 300:
            return f"the receiver answered {status} with more than {MAX_ANSWER_BYTES // 1024} KiB"
    except httpx.HTTPError as exc:
        return f"cannot reach the receiver ({type(exc).__name__})"
    if 200 <= status < 300:
        return None
    return f"the receiver answered {status}"
