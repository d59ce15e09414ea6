"""Dispatch through the Procfile's processes (web, worker, beat), driven through HTTP only (tests/e2e_stack.py).

Fallback across connector types, a worker killed inside a provider call, and a broker that lost every queued
job: each message reaches each connector at most once, and beat's sweep (every SWEEP_INTERVAL) finishes what
no job will.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
import requests

from tests import e2e_stack
from tests.conftest import SMTP_USER, config_for
from tests.e2e_stack import PROVIDER_TIMEOUT, SWEEP_INTERVAL, Host, Stack, new_host, service_headers, worker_stopped

pytestmark = pytest.mark.e2e
# The stack's fixtures, used here by name: this module gets a stack of its own.
e2e_peers, providers, stack = e2e_stack.e2e_peers, e2e_stack.providers, e2e_stack.stack

RECIPIENT = {"email": "ana@example.org", "phone": "+14155552671", "telegram_chat_id": "123456789"}
FINAL = {"delivered", "failed", "expired", "unknown", "unconfirmed"}
LEASE = 2 * PROVIDER_TIMEOUT


def dispatch(stack: Stack, host: Host, text: str, **body: Any) -> requests.Response:
    payload = {"purpose": "notification", "recipient": RECIPIENT, "text": text, **body}
    headers = {**service_headers(), "Idempotency-Key": uuid.uuid4().hex}
    return stack.request("POST", f"/api/internal/hosts/{host.id}/messages", json=payload, headers=headers)


def accepted(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    return response.json()


def message(stack: Stack, message_id: str) -> dict[str, Any]:
    response = stack.request("GET", f"/api/internal/messages/{message_id}", headers=service_headers())
    assert response.status_code == 200, response.text
    return response.json()


def wait_final(stack: Stack, message_id: str, seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        current = message(stack, message_id)
        if current["status"] in FINAL:
            return current
        assert time.monotonic() < deadline, f"not final after {seconds:g} s: {current}\n{stack.output()[-4000:]}"
        time.sleep(0.1)


def outline(final: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(attempt["type"], attempt["status"], attempt["error_code"]) for attempt in final["attempts"]]


def test_fallback_email_then_sms_then_telegram_when_smtp_refuses_the_password_and_twilio_fails(stack, providers):
    host = new_host()
    stack.create(host, "email", config_for("email", providers, password="e2e-wrong-smtp-pw-7c1d"), priority=0)
    stack.create(host, "sms", config_for("sms", providers), priority=1)
    telegram = stack.create(host, "telegram", config_for("telegram", providers), priority=2)
    providers.twilio.mode = "error"  # a 500 from Twilio

    text = f"Fallback check {uuid.uuid4().hex[:8]}"
    created = accepted(dispatch(stack, host, text))
    final = wait_final(stack, created["id"])

    assert final["status"] == "delivered", final
    assert final["delivered_via"] == {"connector_id": telegram["id"], "type": "telegram"}
    assert outline(final) == [
        ("email", "failed", "auth_failed"),
        ("sms", "failed", "provider_error"),
        ("telegram", "sent", None),
    ]
    assert final["attempts"][0]["destination"] != RECIPIENT["email"]  # masked
    [sent] = providers.telegram.wait_for(1)
    assert sent["chat_id"] == RECIPIENT["telegram_chat_id"] and text in sent["text"]
    assert providers.smtp.received == [] and providers.twilio.received == []
    assert text not in stack.request("GET", f"/api/internal/messages/{created['id']}", headers=service_headers()).text


def test_a_worker_killed_inside_the_provider_call_never_sends_twice_on_that_connector(stack, providers):
    host = new_host()
    telegram = stack.create(host, "telegram", config_for("telegram", providers), priority=0)
    email = stack.create(host, "email", config_for("email", providers), priority=1)
    providers.telegram.hold = 3 * PROVIDER_TIMEOUT  # the call is still open when the worker dies

    text = f"Killed mid-call {uuid.uuid4().hex[:8]}"
    created = accepted(dispatch(stack, host, text))
    assert providers.telegram.entered.wait(15), f"the send never reached Telegram:\n{stack.output('worker')[-3000:]}"
    stack.kill("worker")  # SIGKILL to its process group, inside the provider call
    killed_at = time.monotonic()
    inside = message(stack, created["id"])
    assert outline(inside) == [("telegram", "sending", None)], inside

    stack.start("worker")
    stack.wait_ready()
    final = wait_final(stack, created["id"])
    assert time.monotonic() - killed_at >= LEASE - 0.5, "the attempt was given up before its lease ran out"

    assert final["status"] == "delivered", final
    assert final["delivered_via"] == {"connector_id": email["id"], "type": "email"}
    assert outline(final) == [("telegram", "unknown", "unknown"), ("email", "sent", None)]
    [mail] = providers.smtp.wait_for(1)
    assert mail["rcpt_tos"] == [RECIPIENT["email"]] and mail["login"] == SMTP_USER and text in mail["data"]
    # Past the held call's end and a few sweeps: Telegram saw the message once, the one the worker died in.
    time.sleep(max(0.0, killed_at + providers.telegram.hold - time.monotonic()) + 4 * SWEEP_INTERVAL)
    assert providers.telegram.sends_started == 1
    assert len(providers.smtp.received) == 1
    assert outline(message(stack, created["id"])) == outline(final)
    deliveries = stack.request("GET", f"/api/connectors/{telegram['id']}/deliveries", host).json()["deliveries"]
    assert [(item["kind"], item["status"]) for item in deliveries] == [("message", "unknown")]


def flush_broker(stack: Stack) -> list[str]:
    """Lose every job the broker holds (FLUSHDB of the stack's Redis db; on the embedded broker, its queued
    message files); the raw jobs of the queues of messages' decisions (`dispatch`, and `otp` for one-time codes)
    that were lost."""
    if stack.uses_redis:
        client = redis.Redis.from_url(stack.env["REDIS_URL"])
        jobs = [raw.decode() for queue in ("dispatch", "otp") for raw in client.lrange(queue, 0, -1)]
        client.flushdb()
        return jobs
    queued = [path for path in (stack.instance / "broker" / "queue").iterdir() if path.name.endswith(".msg")]
    jobs = [path.read_text() for path in queued if path.name.endswith((".dispatch.msg", ".otp.msg"))]
    for path in queued:
        path.unlink(missing_ok=True)
    return jobs


def test_jobs_lost_with_the_broker_are_recovered_by_the_sweep_once_each_and_an_expired_otp_is_never_sent(
    stack, providers
):
    host = new_host()
    stack.create(host, "telegram", config_for("telegram", providers))
    texts = [f"Lost job {number} {uuid.uuid4().hex[:8]}" for number in range(4)]
    otp_text = f"Your code is {uuid.uuid4().int % 1_000_000:06d}"
    with worker_stopped(stack):
        created = [accepted(dispatch(stack, host, text, channels=["telegram"])) for text in texts]
        otp = accepted(dispatch(stack, host, otp_text, purpose="otp", expires_in=5, channels=["telegram"]))
        otp_sent_at = time.monotonic()
        assert {item["status"] for item in [*created, otp]} == {"queued"}
        time.sleep(max(0.0, otp_sent_at + 5.2 - time.monotonic()))  # the OTP expires with no worker running
        lost = flush_broker(stack)
        for number, item in enumerate([*created, otp]):  # each message's first job was in the broker, and is gone
            assert any(item["id"] in job and "dispatch.advance" in job for job in lost), (
                f"message {number} ({item['id']}) has no job among {len(lost)} in the broker:\n"
                f"{stack.output('web', 'worker')[-8000:]}"
            )
    # The worker is back: only the sweep knows of these messages now.
    finals = [wait_final(stack, item["id"]) for item in created]
    expired = wait_final(stack, otp["id"])

    for final in finals:
        assert final["status"] == "delivered" and outline(final) == [("telegram", "sent", None)], final
    assert expired["status"] == "expired" and expired["attempts"] == [] and expired["delivered_at"] is None
    providers.telegram.wait_for(len(texts))
    time.sleep(4 * SWEEP_INTERVAL)  # a few more sweeps: nothing more is sent
    sent = [item["text"] for item in providers.telegram.received]
    assert len(sent) == len(texts) and all(sum(text in body for body in sent) == 1 for text in texts), sent
    assert not any(otp_text in body for body in sent)
    assert providers.telegram.sends_started == len(texts)
