"""Receipts through the Procfile's processes (tests/e2e_stack.py): a message asked to be confirmed waits for the
provider's signed receipt, and fails over when the receipt says it did not arrive."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from tests import e2e_stack
from tests.conftest import config_for
from tests.e2e_stack import Stack, new_host, service_headers

pytestmark = pytest.mark.e2e
e2e_peers, providers, stack = e2e_stack.e2e_peers, e2e_stack.providers, e2e_stack.stack

PUBLIC = "https://connectors.example.org"
STACK_ENV = {"PUBLIC_BASE_URL": PUBLIC}
AUTH_TOKEN = "twilio-auth-token-e2e-5c1d"


def shown(stack: Stack, message_id: str) -> dict[str, Any]:
    answer = stack.request("GET", f"/api/internal/messages/{message_id}", headers=service_headers())
    assert answer.status_code == 200, answer.text
    return answer.json()


def until(stack: Stack, message_id: str, done: Any, seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while not done(current := shown(stack, message_id)):
        assert time.monotonic() < deadline, f"{current}\n{stack.output('worker')[-3000:]}"
        time.sleep(0.1)
    return current


def receipt(stack: Stack, connector_id: str, sid: str, status: str) -> int:
    form = {"MessageSid": sid, "MessageStatus": status, "ErrorCode": "30003" if status == "undelivered" else ""}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(f"{PUBLIC}/api/webhooks/twilio/{connector_id}", form)
    answer = stack.request(
        "POST", f"/api/webhooks/twilio/{connector_id}", data=form, headers={"X-Twilio-Signature": signature}
    )
    return answer.status_code


@pytest.mark.parametrize("status", ["delivered", "undelivered"])
def test_a_signed_receipt_confirms_or_fails_over_through_the_real_processes(stack, providers, status):
    host = new_host()
    sms = stack.create(host, "sms", config_for("sms", providers, auth_token=AUTH_TOKEN), priority=0)
    email = stack.create(host, "email", config_for("email", providers), priority=1)
    headers = {**service_headers(), "Idempotency-Key": uuid.uuid4().hex}
    body = {
        "purpose": "notification",
        "recipient": {"email": "ana@example.org", "phone": "+14155552671"},
        "text": f"Confirm me {uuid.uuid4().hex[:8]}",
        "confirm": {"by": "delivered", "within": 600},
    }
    created = stack.request("POST", f"/api/internal/hosts/{host.id}/messages", json=body, headers=headers)
    assert created.status_code == 202, created.text
    message_id = created.json()["id"]
    until(stack, message_id, lambda m: m["status"] == "sent")
    [sent] = providers.twilio.wait_for(1)
    assert sent["status_callback"] == f"{PUBLIC}/api/webhooks/twilio/{sms['id']}"
    assert receipt(stack, sms["id"], sent["sid"], status) in (200, 204)
    final = until(stack, message_id, lambda m: m["status"] == "delivered")
    expected = sms if status == "delivered" else email
    assert final["delivered_via"]["connector_id"] == expected["id"]
    assert final["attempts"][0]["receipt"] == status
    assert len(providers.smtp.received) == (0 if status == "delivered" else 1)


def test_silence_until_the_expiry_is_unconfirmed_through_the_real_processes(stack, providers):
    """No receipt at all: beat's sweep ends it at its expiry, `unconfirmed`, and nothing else is sent."""
    host = new_host()
    stack.create(host, "sms", config_for("sms", providers, auth_token=AUTH_TOKEN))
    headers = {**service_headers(), "Idempotency-Key": uuid.uuid4().hex}
    body = {
        "purpose": "otp",
        "recipient": {"phone": "+14155552671"},
        "text": "Your code is 314159",
        "expires_in": 5,
        "confirm": {"by": "delivered", "within": 15},
    }
    created = stack.request("POST", f"/api/internal/hosts/{host.id}/messages", json=body, headers=headers)
    assert created.status_code == 202, created.text
    final = until(stack, created.json()["id"], lambda m: m["status"] not in ("queued", "sending", "sent"))
    assert final["status"] == "unconfirmed" and [a["receipt"] for a in final["attempts"]] == [None]
    assert len(providers.twilio.received) == 1
