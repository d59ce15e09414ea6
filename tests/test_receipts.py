"""Receipts and confirmation: a message asked to be confirmed waits `sent` after a provider accepts it, until a
signed receipt says it reached the phone; `undelivered` or silence tries the next channel; nothing by its expiry
is `unconfirmed`."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from twilio.request_validator import RequestValidator

from tests.conftest import PUBLIC_BASE_URL, Host, config_for, create_connector, service_headers
from tests.support import db_id
from tests.test_dispatch import dispatch, message, sweep, wait_final

pytestmark = pytest.mark.usefixtures("worker")

AUTH_TOKEN = "twilio-auth-token-3f7c2a91"
APP_SECRET = "meta-app-secret-7b3e90c1d2"
CONFIRM = {"by": "delivered", "within": 15}


def twilio_receipt(client: FlaskClient, connector_id: str, sid: str, status: str, **extra: str) -> Any:
    url = f"{PUBLIC_BASE_URL}/api/webhooks/twilio/{connector_id}"
    form = {"MessageSid": sid, "MessageStatus": status, "AccountSid": "AC" + "b" * 32, **extra}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, form)
    return client.post(f"/api/webhooks/twilio/{connector_id}", data=form, headers={"X-Twilio-Signature": signature})


def whatsapp_receipt(client: FlaskClient, connector_id: str, wamid: str, status: str) -> Any:
    entry = {"id": wamid, "status": status, "timestamp": str(int(time.time())), "recipient_id": "14155552671"}
    if status == "failed":
        entry["errors"] = [{"code": 131026, "title": "Message undeliverable"}]
    body = json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "1",
                    "changes": [{"field": "messages", "value": {"messaging_product": "whatsapp", "statuses": [entry]}}],
                }
            ],
        }
    ).encode()
    signature = "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return client.post(
        f"/api/webhooks/whatsapp/{connector_id}", data=body, content_type="application/json",
        headers={"X-Hub-Signature-256": signature},
    )  # fmt: skip


def receipt_sms(client: FlaskClient, host: Host, peers: Any, **fields: Any) -> dict[str, Any]:
    return create_connector(client, host, "sms", "sms with receipts", config=config_for("sms", auth_token=AUTH_TOKEN),
                            **fields)  # fmt: skip


def until(client: FlaskClient, message_id: str, done: Any, seconds: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while not done(shown := message(client, message_id)):
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)
    return shown


def elapse_the_wait(app: Flask, message_id: str) -> None:
    """What `within` seconds of silence come to: the message is due, and the sweep takes it."""
    from app.extensions import db

    with app.app_context():
        db.session.execute(text("UPDATE messages SET due_at = created_at WHERE id = :m"), {"m": db_id(app, message_id)})
        db.session.commit()
    sweep(app)


def test_a_delivered_receipt_confirms_the_message(app, client, host, peers):
    sms = receipt_sms(client, host, peers, priority=0)
    create_connector(client, host, "email", peers=peers, priority=1)
    created = dispatch(client, host.id, purpose="notification", confirm=CONFIRM).get_json()
    waiting = until(client, created["id"], lambda m: m["status"] == "sent")
    [attempt] = waiting["attempts"]
    [sent] = peers.twilio.wait_for(1)
    assert attempt["provider_message_id"] == sent["sid"] and attempt["receipt"] is None
    assert sent["status_callback"] == f"{PUBLIC_BASE_URL}/api/webhooks/twilio/{sms['id']}"
    assert twilio_receipt(client, sms["id"], sent["sid"], "delivered").status_code in (200, 204)
    final = message(client, created["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == sms["id"]
    assert final["attempts"][0]["receipt"] == "delivered" and final["attempts"][0]["receipt_at"].endswith("Z")
    assert peers.smtp.received == []


def test_an_undelivered_receipt_tries_the_next_channel_at_once(app, client, host, peers):
    sms = receipt_sms(client, host, peers, priority=0)
    email = create_connector(client, host, "email", peers=peers, priority=1)
    created = dispatch(client, host.id, purpose="notification", confirm=CONFIRM).get_json()
    until(client, created["id"], lambda m: m["status"] == "sent")
    [sent] = peers.twilio.wait_for(1)
    answer = twilio_receipt(client, sms["id"], sent["sid"], "undelivered", ErrorCode="30003")
    assert answer.status_code in (200, 204)
    final = wait_final(app, client, created["id"])  # the email connector cannot report: its acceptance counts
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == email["id"]
    first = final["attempts"][0]
    assert (first["status"], first["receipt"], first["error_code"]) == ("sent", "undelivered", "undelivered")
    assert "30003" in first["message"]
    assert len(peers.smtp.received) == 1 and len(peers.twilio.received) == 1


def test_silence_tries_the_next_channel_and_a_late_receipt_on_the_first_still_counts(app, client, host, peers):
    sms = receipt_sms(client, host, peers, priority=0)
    whatsapp = create_connector(client, host, "whatsapp", "whatsapp with receipts",
                                config=config_for("whatsapp", app_secret=APP_SECRET), priority=1)  # fmt: skip
    created = dispatch(client, host.id, purpose="notification", confirm=CONFIRM).get_json()
    until(client, created["id"], lambda m: m["status"] == "sent")
    elapse_the_wait(app, created["id"])  # no receipt within `within`
    until(client, created["id"], lambda m: m["status"] == "sent" and len(m["attempts"]) == 2)
    assert [m["to"] for m in peers.whatsapp.received] == ["14155552671"]
    [sms_sent] = peers.twilio.received
    assert twilio_receipt(client, sms["id"], sms_sent["sid"], "read").status_code in (200, 204)
    final = message(client, created["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == sms["id"]
    # A receipt for the second channel after the end is recorded and changes nothing.
    wamid = peers.whatsapp.received[0]["wamid"]
    assert whatsapp_receipt(client, whatsapp["id"], wamid, "delivered").status_code in (200, 204)
    after = message(client, created["id"])
    assert after["status"] == "delivered" and after["delivered_via"]["connector_id"] == sms["id"]
    assert after["attempts"][1]["receipt"] == "delivered"


def test_nothing_confirmed_by_the_expiry_is_unconfirmed(app, client, host, peers):
    receipt_sms(client, host, peers)
    created = dispatch(client, host.id, purpose="notification", confirm=CONFIRM, expires_in=5).get_json()
    final = wait_final(app, client, created["id"], seconds=20)
    assert final["status"] == "unconfirmed" and final["delivered_via"] is None
    assert [(a["status"], a["receipt"]) for a in final["attempts"]] == [("sent", None)]
    events = client.get("/api/internal/events?after=0&limit=100", headers=service_headers()).get_json()["events"]
    assert [e["type"] for e in events if e["type"].startswith("message.")] == ["message.unconfirmed"]


def test_a_connector_that_cannot_report_receipts_counts_the_providers_acceptance(app, client, host, peers):
    telegram = create_connector(client, host, "telegram", peers=peers)
    final = wait_final(app, client, dispatch(client, host.id, purpose="notification", confirm=CONFIRM).get_json()["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == telegram["id"]
    assert final["attempts"][0]["receipt"] is None and final["attempts"][0]["provider_message_id"]


def test_receipts_move_forward_only_and_a_message_without_confirm_only_records_them(app, client, host, peers):
    sms = receipt_sms(client, host, peers)
    final = wait_final(app, client, dispatch(client, host.id, purpose="notification").get_json()["id"])
    assert final["status"] == "delivered"  # accepted is enough without confirm
    [sent] = peers.twilio.received
    for status in ("read", "delivered", "sent", "undelivered", "read"):
        assert twilio_receipt(client, sms["id"], sent["sid"], status).status_code in (200, 204)
    [attempt] = message(client, final["id"])["attempts"]
    assert (attempt["receipt"], attempt["error_code"]) == ("read", None)


def test_confirm_without_a_public_address_is_422_confirm_unavailable(app, client, host):
    create_connector(client, host, "telegram")
    app.config["PUBLIC_BASE_URL"] = None
    try:
        refused = dispatch(client, host.id, purpose="notification", confirm={"by": "delivered"})
    finally:
        app.config["PUBLIC_BASE_URL"] = PUBLIC_BASE_URL
    assert refused.status_code == 422 and refused.get_json()["error_code"] == "confirm_unavailable"


@pytest.mark.parametrize(
    "confirm", [{"by": "read"}, {"within": 30}, {"by": "delivered", "within": 14}, {"by": "delivered", "within": "60"}]
)
def test_a_bad_confirm_is_400(client, host, confirm):
    create_connector(client, host, "telegram")
    refused = dispatch(client, host.id, key=uuid.uuid4().hex, confirm=confirm)
    assert refused.status_code == 400 and "confirm" in refused.get_json()["errors"]["json"]
