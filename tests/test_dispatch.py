"""Dispatch: messages through a Host's connectors in priority order, with fallback, rounds, expiry, once each."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text

from tests.conftest import Host, create_connector, make_token, service_headers
from tests.support import database_work, db_id, run_periodic

pytestmark = pytest.mark.usefixtures("worker")

RECIPIENT = {"email": "ana@example.org", "phone": "+14155552671", "telegram_chat_id": "123456789"}
OTP_TEXT = "Your code is 482913. It expires in 10 minutes."


def dispatch(client: FlaskClient, host_id: Any, key: str | None = None, **body: Any) -> Any:
    payload = {"purpose": "otp", "recipient": RECIPIENT, "text": OTP_TEXT, **body}
    headers = {**service_headers(), "Idempotency-Key": key or uuid.uuid4().hex}
    return client.post(f"/api/internal/hosts/{host_id}/messages", json=payload, headers=headers)


def message(client: FlaskClient, message_id: str) -> dict[str, Any]:
    response = client.get(f"/api/internal/messages/{message_id}", headers=service_headers())
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def sweep(app: Flask) -> None:
    """What Celery beat runs every SWEEP_INTERVAL."""
    run_periodic(app, "dispatch.sweep")


def wait_final(app: Flask, client: FlaskClient, message_id: str, seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        current = message(client, message_id)
        if current["status"] in {"delivered", "failed", "expired", "unknown", "unconfirmed"}:
            return current
        assert time.monotonic() < deadline, current
        sweep(app)  # rounds come due; beat would do this
        time.sleep(0.2)


def test_a_host_token_is_403_and_needs_a_service_token(client, host):
    create_connector(client, host, "telegram")
    headers = {**host.headers, "Idempotency-Key": "k1"}
    body = {"purpose": "otp", "recipient": RECIPIENT, "text": OTP_TEXT}
    assert client.post(f"/api/internal/hosts/{host.id}/messages", json=body, headers=headers).status_code == 403
    assert client.get(f"/api/internal/hosts/{host.id}/messages", headers=host.headers).status_code == 403


def test_an_unknown_host_is_404(client):
    response = dispatch(client, uuid.uuid4())
    assert response.status_code == 404 and response.get_json()["message"] == "Host not found"


def test_no_route_is_422_naming_what_was_looked_at(client, host):
    create_connector(client, host, "telegram")
    response = dispatch(client, host.id, recipient={"email": "ana@example.org", "phone": "+14155552671"})
    body = response.get_json()
    assert response.status_code == 422 and body["error_code"] == "no_route"
    assert "email, phone" in body["message"] and "email, sms, whatsapp" in body["message"]


@pytest.mark.parametrize(
    ("headers", "body", "field"),
    [
        ({}, {}, "Idempotency-Key"),
        ({"Idempotency-Key": "x" * 256}, {}, "Idempotency-Key"),
        ({"Idempotency-Key": "bad\u00e9"}, {}, "Idempotency-Key"),
        ({"Idempotency-Key": "k"}, {"recipient": {}}, "recipient"),
        ({"Idempotency-Key": "k"}, {"text": ""}, "text"),
        ({"Idempotency-Key": "k"}, {"expires_in": 4}, "expires_in"),
        ({"Idempotency-Key": "k"}, {"channels": ["pigeon"]}, "channels"),
        ({"Idempotency-Key": "k"}, {"purpose": "spam"}, "purpose"),
    ],
)
def test_bad_requests_are_400_naming_the_field(client, host, headers, body, field):
    create_connector(client, host, "telegram")
    payload = {"purpose": "otp", "recipient": RECIPIENT, "text": OTP_TEXT, **body}
    response = client.post(
        f"/api/internal/hosts/{host.id}/messages", json=payload, headers={**service_headers(), **headers}
    )
    assert response.status_code == 400, response.get_json()
    errors = response.get_json()["errors"]
    assert field in errors.get("headers", {}) | errors.get("json", {}), errors


def test_a_message_is_delivered_by_the_first_connector_in_priority_order(app, client, host, peers):
    create_connector(client, host, "sms", peers=peers, priority=1)
    email = create_connector(client, host, "email", peers=peers, priority=0)
    response = dispatch(client, host.id)
    assert response.status_code == 202, response.get_json()
    created = response.get_json()
    assert created["status"] in {"queued", "sending", "delivered"} and created["host_id"] == str(host.id)
    assert created["created_at"].endswith("Z") and created["expires_at"].endswith("Z")
    final = wait_final(app, client, created["id"])
    assert final["status"] == "delivered" and final["delivered_at"].endswith("Z")
    assert final["delivered_via"] == {"connector_id": email["id"], "type": "email"}
    [attempt] = final["attempts"]
    assert attempt["status"] == "sent" and attempt["destination"] == "a***@example.org" and attempt["type"] == "email"
    assert OTP_TEXT in peers.smtp.wait_for(1)[0]["data"]
    assert peers.twilio.received == []
    deliveries = client.get(f"/api/connectors/{email['id']}/deliveries", headers=host.headers).get_json()
    assert [(d["kind"], d["status"]) for d in deliveries["deliveries"]] == [("message", "sent")]
    assert OTP_TEXT not in json.dumps(deliveries)


def test_fallback_email_then_sms_then_telegram_when_the_first_are_broken(app, client, host, peers):
    email = create_connector(client, host, "email", peers=peers, priority=0)
    sms = create_connector(client, host, "sms", peers=peers, priority=1)
    telegram = create_connector(client, host, "telegram", peers=peers, priority=2)
    peers.smtp.credentials["password"] = "the-password-was-changed"  # the Host changed it at the provider
    peers.twilio.mode = "error"
    final = wait_final(app, client, dispatch(client, host.id).get_json()["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == telegram["id"]
    assert [(a["type"], a["status"], a["error_code"]) for a in final["attempts"]] == [
        ("email", "failed", "auth_failed"),
        ("sms", "failed", "provider_error"),
        ("telegram", "sent", None),
    ]
    assert [m["text"] for m in peers.telegram.received] == [OTP_TEXT]
    listed = {
        c["id"]: c["is_verified"] for c in client.get("/api/connectors", headers=host.headers).get_json()["connectors"]
    }
    assert listed == {email["id"]: False, sms["id"]: False, telegram["id"]: True}


def test_a_permanent_failure_is_not_retried_and_a_transient_one_is_after_a_backoff(app, client, host, peers):
    create_connector(client, host, "email", peers=peers, priority=0)
    create_connector(client, host, "sms", peers=peers, priority=1)
    peers.smtp.mode = "auth"  # permanent: out of later rounds
    peers.twilio.mode = "error"  # transient
    created = dispatch(client, host.id, purpose="notification").get_json()
    deadline = time.monotonic() + 20
    while [a["type"] for a in message(client, created["id"])["attempts"]].count("sms") < 2:
        assert time.monotonic() < deadline
        sweep(app)
        time.sleep(0.2)
    retrying = message(client, created["id"])
    assert retrying["status"] in {"retrying", "sending"}
    peers.twilio.mode = "ok"  # the provider comes back
    final = wait_final(app, client, created["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["type"] == "sms"
    types = [a["type"] for a in final["attempts"]]
    assert types.count("email") == 1 and types[-1] == "sms" and len(peers.twilio.received) == 1
    started = [a["started_at"] for a in final["attempts"] if a["type"] == "sms"]
    assert started == sorted(started)


def test_every_candidate_out_for_good_is_failed(app, client, host, peers):
    create_connector(client, host, "email", peers=peers)
    peers.smtp.mode = "auth"
    final = wait_final(app, client, dispatch(client, host.id, channels=["email"]).get_json()["id"])
    assert final["status"] == "failed" and final["delivered_via"] is None
    assert [a["error_code"] for a in final["attempts"]] == ["auth_failed"]


def test_an_otp_whose_every_channel_is_down_expires_and_is_never_sent_later(app, client, host, peers):
    create_connector(client, host, "sms", peers=peers)
    peers.twilio.mode = "error"
    created = dispatch(client, host.id, expires_in=5).get_json()
    final = wait_final(app, client, created["id"], seconds=25)
    assert final["status"] == "expired" and len(final["attempts"]) >= 2
    peers.twilio.mode = "ok"
    for _ in range(3):
        sweep(app)
        time.sleep(0.3)
    assert peers.twilio.received == [] and message(client, created["id"])["status"] == "expired"


def test_the_same_key_and_body_is_the_same_message_and_another_body_is_422(app, client, host, peers):
    create_connector(client, host, "telegram", peers=peers)
    first = dispatch(client, host.id, key="will-release-1")
    again = dispatch(client, host.id, key="will-release-1")
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    other = dispatch(client, host.id, key="will-release-1", text="Another text")
    assert other.status_code == 422 and other.get_json()["error_code"] == "idempotency_key_reused"
    wait_final(app, client, first.get_json()["id"])
    assert len(peers.telegram.received) == 1
    # Another Host may use the same key: keys are per Host.
    other_host = Host(uuid.uuid4(), "")
    other_host.token = make_token(str(other_host.id))
    create_connector(client, other_host, "telegram", peers=peers)
    assert dispatch(client, other_host.id, key="will-release-1").status_code == 202


def test_twenty_identical_requests_at_once_make_one_message(app, client, host, peers):
    create_connector(client, host, "telegram", peers=peers)

    def send(_: int) -> tuple[int, str]:
        response = app.test_client().post(
            f"/api/internal/hosts/{host.id}/messages",
            json={"purpose": "otp", "recipient": RECIPIENT, "text": OTP_TEXT},
            headers={**service_headers(), "Idempotency-Key": "concurrent-key"},
        )
        return response.status_code, response.get_json().get("id")

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(send, range(20)))
    assert sorted(status for status, _ in answers).count(202) == 1, answers
    assert {status for status, _ in answers} <= {200, 202} and len({mid for _, mid in answers}) == 1
    wait_final(app, client, answers[0][1])
    time.sleep(0.5)
    assert len(peers.telegram.received) == 1


def test_a_lost_job_is_recovered_by_the_sweep(app, client, host, peers, tmp_path):
    """The broker lost the job (Redis restarted empty): the database says the message is due, the sweep acts."""
    from tests.support import sibling_app

    create_connector(client, host, "telegram", peers=peers)
    lonely = sibling_app(app, tmp_path)  # its broker has no worker: the job it queues is never run
    created = (
        lonely.test_client()
        .post(
            f"/api/internal/hosts/{host.id}/messages",
            json={"purpose": "otp", "recipient": RECIPIENT, "text": OTP_TEXT},
            headers={**service_headers(), "Idempotency-Key": "lost"},
        )
        .get_json()
    )
    time.sleep(0.5)
    assert message(client, created["id"])["status"] == "queued" and peers.telegram.received == []
    final = wait_final(app, client, created["id"])
    assert final["status"] == "delivered" and len(peers.telegram.received) == 1


def test_the_text_is_found_nowhere_but_the_peers_inbox(app, client, host, peers, caplog):
    create_connector(client, host, "email", peers=peers)
    secret_text = "Survivor code 99173355 for the will"
    created = dispatch(client, host.id, text=secret_text, subject="Subject 5521", html="<b>99173355</b>")
    final = wait_final(app, client, created.get_json()["id"])
    assert final["status"] == "delivered" and "99173355" in peers.smtp.received[0]["data"]
    answers = json.dumps([created.get_json(), final, client.get(
        f"/api/internal/hosts/{host.id}/messages", headers=service_headers()).get_json()])  # fmt: skip
    assert "99173355" not in answers and "5521" not in answers and "ana@example.org" not in answers
    from app.extensions import db

    with app.app_context():
        rows = [
            repr(row)
            for table in ("messages", "delivery_attempts")
            for row in db.session.execute(text(f"SELECT * FROM {table}")).all()
        ]
        # Once final, the sealed words are erased.
        sealed = db.session.execute(
            text("SELECT body_key_id, body_sealed FROM messages WHERE id = :id"), {"id": db_id(app, final["id"])}
        ).one()
        db.session.remove()
    assert not any("99173355" in row or "ana@example.org" in row for row in rows)
    assert tuple(sealed) == (None, None)
    ours = [record.getMessage() for record in caplog.records if not record.name.startswith("mail.")]  # not the peer's
    assert ours and not any("99173355" in line for line in ours)


def test_a_providers_words_quoting_the_recipient_are_masked(app, client, host, peers):
    create_connector(client, host, "sms", peers=peers)
    peers.twilio.mode = "reject"  # "The 'To' number +14155552671 is not a valid phone number."
    final = wait_final(app, client, dispatch(client, host.id, channels=["sms"]).get_json()["id"])
    [attempt] = final["attempts"]
    assert attempt["error_code"] == "destination_rejected"
    assert "+14*******71" in attempt["message"] and "4155552671" not in json.dumps(final)
    events = client.get("/api/internal/events", headers=service_headers()).get_json()["events"]
    assert "4155552671" not in json.dumps(events)


def test_a_providers_words_quoting_the_message_do_not_keep_it(app, client, host, peers):
    create_connector(client, host, "sms", peers=peers)
    peers.twilio.mode = "quote"
    secret_text = "Survivor code 99173355 for the will"
    created = dispatch(client, host.id, text=secret_text, channels=["sms"]).get_json()
    deadline = time.monotonic() + 10
    while not (shown := message(client, created["id"]))["attempts"]:
        assert time.monotonic() < deadline, shown
        time.sleep(0.05)
    attempt = shown["attempts"][0]
    assert attempt["error_code"] == "provider_error" and "[the message]" in attempt["message"], attempt
    assert "99173355" not in json.dumps(shown)


def test_the_list_is_newest_first_with_each_messages_attempts_read_in_one_query(app, client, host, peers):
    create_connector(client, host, "email", peers=peers)
    sent = [dispatch(client, host.id, text=f"Message {n}").get_json()["id"] for n in range(3)]
    for message_id in sent:
        assert wait_final(app, client, message_id)["status"] == "delivered"

    with database_work(app) as work:
        listed = client.get(f"/api/internal/hosts/{host.id}/messages", headers=service_headers())
    assert listed.status_code == 200, listed.get_json()
    messages = listed.get_json()["messages"]
    assert [m["id"] for m in messages] == sent[::-1]
    for shown in messages:
        assert shown == message(client, shown["id"])  # the same view as one message, attempts included
        [attempt] = shown["attempts"]
        assert attempt["status"] == "sent"
    assert len(work.statements) == 3, work.statements  # the Host, the page, every attempt of the page

    page = client.get(f"/api/internal/hosts/{host.id}/messages?limit=2&status=delivered", headers=service_headers())
    assert [m["id"] for m in page.get_json()["messages"]] == sent[:0:-1]
    none = client.get(f"/api/internal/hosts/{host.id}/messages?status=failed", headers=service_headers())
    assert none.get_json() == {"messages": []}
