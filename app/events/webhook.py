"""POST one event to EVENTS_WEBHOOK_URL, signed as the Standard Webhooks specification says."""

from __future__ import annotations

from datetime import UTC, datetime


def post_event(url: str, secret: str, event_id: int, payload: str, timeout: float) -> str | None:
    """None when the receiver took it (2xx); otherwise a short reason, without the receiver's body."""
    # The web process never posts: the client libraries are loaded where they are used.
    import httpx
    from standardwebhooks import Webhook

    msg_id, now = f"evt_{event_id}", datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, payload),
    }
    try:
        response = httpx.post(url, content=payload.encode(), headers=headers, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        return f"cannot reach the receiver ({type(exc).__name__})"
    if 200 <= response.status_code < 300:
        return None
    return f"the receiver answered {response.status_code}"
