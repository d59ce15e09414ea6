"""POST /api/connectors/:id/test through a real worker to loopback peers, hit by the real client libraries."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from celery.signals import before_task_publish
from sqlalchemy import text

from tests.conftest import (
    SECRET_VALUES,
    TELEGRAM_TOKEN,
    TWILIO_ACCOUNT_SID,
    USES_REDIS,
    config_for,
    create_connector,
)
from tests.support import DESTINATIONS, closed_port, db_id, send_test

pytestmark = pytest.mark.usefixtures("worker")


def connector_state(client, host, connector_id):
    listed = client.get("/api/connectors", headers=host.headers).get_json()["connectors"]
    return next(c for c in listed if c["id"] == connector_id)


def peer_for(peers, kind):
    return {"email": peers.smtp, "sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram}[kind]


@pytest.mark.parametrize("kind", ["email", "sms", "whatsapp", "telegram"])
def test_success_delivers_exactly_one_message_and_verifies_the_connector(client, host, peers, kind):
    connector = create_connector(client, host, kind, peers=peers)
    response = send_test(client, host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["success"] is True and body["message"] == "Test message sent successfully"
    assert isinstance(body["delivery_time_ms"], int) and 0 <= body["delivery_time_ms"] < 4000

    received = peer_for(peers, kind).wait_for(1)
    assert len(received) == 1
    message = received[0]
    if kind == "email":
        assert message["mail_from"] == "noreply@bapba.example" and message["rcpt_tos"] == [DESTINATIONS[kind]]
        assert "BAPBA connector test" in message["data"] and "text/html" in message["data"]
    elif kind == "sms":
        assert (message["from"], message["to"], message["account"]) == (
            "+14155550100",
            DESTINATIONS[kind],
            TWILIO_ACCOUNT_SID,
        )
    elif kind == "whatsapp":
        assert message["to"] == DESTINATIONS[kind].lstrip("+") and message["type"] == "text"
        assert message["messaging_product"] == "whatsapp" and message["version"] == "v24.0"
    else:
        assert message["chat_id"] == DESTINATIONS[kind] and "BAPBA" in message["text"]
    assert connector_state(client, host, connector["id"])["is_verified"] is True


def test_email_over_starttls_with_a_certificate_trusted_through_ssl_cert_file(client, host, peers):
    config = config_for("email", peers, smtp_port=peers.smtp_tls.port, security="starttls")
    created = client.post(
        "/api/connectors", json={"type": "email", "name": "tls", "config": config}, headers=host.headers
    )
    response = send_test(client, host, created.get_json()["id"], "survivor@example.org")
    assert response.status_code == 200, response.get_json()
    assert peers.smtp_tls.wait_for(1)[0]["tls"] is True


def test_email_to_a_server_without_starttls_fails_unless_security_is_none(client, host, peers):
    config = config_for("email", peers, security="starttls")
    created = client.post(
        "/api/connectors", json={"type": "email", "name": "x", "config": config}, headers=host.headers
    )
    response = send_test(client, host, created.get_json()["id"], "survivor@example.org")
    assert response.status_code == 502
    assert "STARTTLS" in response.get_json()["message"]
    assert peers.smtp.received == []


BAD_CREDENTIALS = {
    "email": {"password": "wrong-password"},
    "sms": {"api_key_secret": "wrong-secret"},
    "whatsapp": {"access_token": "wrong-token"},
    "telegram": {"bot_token": "7012345678:AAHwrongwrongwrongwrongwrong1234"},
}
AUTH_MESSAGES = {
    "email": "SMTP server rejected the login",
    "sms": "Twilio rejected the credentials",
    "whatsapp": "WhatsApp rejected the access token",
    "telegram": "Telegram rejected the bot token",
}


@pytest.mark.parametrize("kind", ["email", "sms", "whatsapp", "telegram"])
def test_bad_credentials_are_502_auth_failed_and_unverify(app, client, host, peers, kind):
    config = config_for(kind, peers, **BAD_CREDENTIALS[kind])
    created = client.post("/api/connectors", json={"type": kind, "name": "x", "config": config}, headers=host.headers)
    connector_id = created.get_json()["id"]
    _mark_verified(app, connector_id)

    response = send_test(client, host, connector_id, DESTINATIONS[kind])
    assert response.status_code == 502
    body = response.get_json()
    assert body["success"] is False and body["error_code"] == "auth_failed"
    assert body["code"] == 502 and body["status"] == "Bad Gateway"
    assert AUTH_MESSAGES[kind] in body["message"]
    assert peer_for(peers, kind).received == []
    assert connector_state(client, host, connector_id)["is_verified"] is False


REJECT_MESSAGES = {
    "email": "SMTP server rejected the recipient",
    "sms": "Twilio rejected the recipient",
    "whatsapp": "WhatsApp rejected the recipient",
    "telegram": "Telegram: Chat not found",
}


@pytest.mark.parametrize("kind", ["email", "sms", "whatsapp", "telegram"])
def test_rejected_recipient_is_502_destination_rejected(client, host, peers, kind):
    connector = create_connector(client, host, kind, peers=peers)
    peer_for(peers, kind).mode = "reject"
    response = send_test(client, host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 502
    body = response.get_json()
    assert body["error_code"] == "destination_rejected"
    assert REJECT_MESSAGES[kind].lower() in body["message"].lower()


@pytest.mark.parametrize("kind", ["email", "sms", "whatsapp", "telegram"])
def test_provider_failure_is_502_provider_error(client, host, peers, kind):
    connector = create_connector(client, host, kind, peers=peers)
    peer_for(peers, kind).mode = "error"
    response = send_test(client, host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 502
    assert response.get_json()["error_code"] == "provider_error"


@pytest.mark.parametrize("kind", ["email", "sms", "whatsapp", "telegram"])
def test_slow_provider_is_502_within_the_timeout_plus_a_second(app, client, host, peers, kind):
    connector = create_connector(client, host, kind, peers=peers)
    peer_for(peers, kind).mode = "slow"
    started = time.monotonic()
    response = send_test(client, host, connector["id"], DESTINATIONS[kind])
    elapsed = time.monotonic() - started
    assert response.status_code == 502
    assert response.get_json()["error_code"] == "provider_unreachable"
    assert elapsed < app.config["TEST_DELIVERY_TIMEOUT"] + 1


@pytest.mark.parametrize("kind", ["email", "sms", "whatsapp", "telegram"])
def test_unreachable_provider_is_502_provider_unreachable(app, client, host, peers, kind):
    closed = closed_port()
    config = config_for(kind, peers, **({"smtp_port": closed} if kind == "email" else {}))
    created = client.post("/api/connectors", json={"type": kind, "name": "x", "config": config}, headers=host.headers)
    base_key = {"sms": "TWILIO_API_BASE_URL", "whatsapp": "WHATSAPP_API_BASE_URL", "telegram": "TELEGRAM_API_BASE_URL"}
    if kind != "email" and USES_REDIS:
        pytest.skip("the subprocess worker's base URLs are fixed for the run")
    saved = app.config.get(base_key.get(kind, ""), None)
    if kind != "email":
        app.config[base_key[kind]] = f"http://127.0.0.1:{closed}"
    try:
        response = send_test(client, host, created.get_json()["id"], DESTINATIONS[kind])
    finally:
        if kind != "email":
            app.config[base_key[kind]] = saved
    assert response.status_code == 502
    assert response.get_json()["error_code"] == "provider_unreachable"


def test_sms_api_key_without_account_sid_is_a_clear_config_error(client, host, peers):
    config = config_for("sms")
    del config["account_sid"]
    created = client.post("/api/connectors", json={"type": "sms", "name": "x", "config": config}, headers=host.headers)
    response = send_test(client, host, created.get_json()["id"], "+14155550199")
    assert response.status_code == 502
    assert response.get_json()["error_code"] == "config_invalid"
    assert "account_sid" in response.get_json()["message"]


def test_whatsapp_template_is_sent_when_configured(client, host, peers):
    config = config_for("whatsapp", template_name="connector_test", template_language="en")
    created = client.post(
        "/api/connectors", json={"type": "whatsapp", "name": "t", "config": config}, headers=host.headers
    )
    assert send_test(client, host, created.get_json()["id"], "+14155550188").status_code == 200
    message = peers.whatsapp.wait_for(1)[0]
    assert message["type"] == "template"
    assert message["template"] == {"name": "connector_test", "language": {"code": "en"}}


def test_telegram_channel_names_are_accepted(client, host, peers):
    connector = create_connector(client, host, "telegram", peers=peers)
    assert send_test(client, host, connector["id"], "@bapba_alerts").status_code == 200
    assert send_test(client, host, connector["id"], "-1001234567890").status_code == 200
    assert [m["chat_id"] for m in peers.telegram.wait_for(2)] == ["@bapba_alerts", "-1001234567890"]


@pytest.mark.parametrize(
    ("kind", "destination"),
    [
        ("email", "not-an-address"),
        ("email", "+14155550199"),
        ("sms", "survivor@example.org"),
        ("sms", "4155550199"),
        ("sms", "+1234567890"),
        ("whatsapp", "12345"),
        ("telegram", "chat name"),
        ("telegram", "@a"),
        ("telegram", "+14155550199"),
    ],
)
def test_invalid_destinations_are_400_and_queue_nothing(client, host, peers, kind, destination):
    connector = create_connector(client, host, kind, peers=peers)
    response = send_test(client, host, connector["id"], destination)
    assert response.status_code == 400
    assert "test_destination" in response.get_json()["errors"]["json"]
    deliveries = client.get(f"/api/connectors/{connector['id']}/deliveries", headers=host.headers).get_json()
    assert deliveries == {"deliveries": []}


def test_missing_destination_is_400_and_other_hosts_connector_is_404(client, host, other_host, peers):
    connector = create_connector(client, host, "email", peers=peers)
    missing = client.post(f"/api/connectors/{connector['id']}/test", json={}, headers=host.headers)
    assert missing.status_code == 400
    assert send_test(client, other_host, connector["id"], "a@example.org").status_code == 404
    assert send_test(client, host, str(uuid.uuid4()), "a@example.org").status_code == 404
    assert peers.smtp.received == []


def test_attempt_log_lists_outcomes_newest_first_with_masked_destinations(client, host, peers):
    connector = create_connector(client, host, "email", peers=peers)
    assert send_test(client, host, connector["id"], "survivor@example.org").status_code == 200
    peers.smtp.mode = "reject"
    assert send_test(client, host, connector["id"], "other@example.org").status_code == 502

    response = client.get(f"/api/connectors/{connector['id']}/deliveries", headers=host.headers)
    assert response.status_code == 200
    newest, oldest = response.get_json()["deliveries"]
    assert newest["status"] == "failed" and newest["error_code"] == "destination_rejected"
    assert oldest["status"] == "sent" and oldest["error_code"] is None and oldest["delivery_time_ms"] >= 0
    assert oldest["destination"] == "s***@example.org"
    assert "survivor" not in response.get_data(as_text=True)

    limited = client.get(f"/api/connectors/{connector['id']}/deliveries?limit=1", headers=host.headers)
    assert [d["id"] for d in limited.get_json()["deliveries"]] == [newest["id"]]
    assert client.get(f"/api/connectors/{connector['id']}/deliveries?limit=0", headers=host.headers).status_code == 400
    assert client.get(f"/api/connectors/{connector['id']}/deliveries?limit=x", headers=host.headers).status_code == 400


def test_no_secret_in_the_broker_message_the_result_or_the_attempt_log(app, client, host, peers, monkeypatch):
    from celery.result import AsyncResult

    monkeypatch.setattr(AsyncResult, "forget", lambda self: None)  # keep stored results for inspection
    published: list[str] = []

    def capture(body=None, headers=None, **_):  # noqa: ANN001, ANN202
        published.append(json.dumps([body, headers], default=str))

    before_task_publish.connect(capture, weak=False)
    try:
        ids = []
        for kind in ("email", "sms", "whatsapp", "telegram"):
            connector = create_connector(client, host, kind, peers=peers)
            ids.append(connector["id"])
            assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 200
        for kind in ("email", "sms", "whatsapp", "telegram"):
            peer_for(peers, kind).mode = "auth"
        for connector_id, kind in zip(ids, ("email", "sms", "whatsapp", "telegram"), strict=True):
            assert send_test(client, host, connector_id, DESTINATIONS[kind]).status_code == 502
    finally:
        before_task_publish.disconnect(capture)

    assert len([message for message in published if "deliveries.send_test" in message]) == 8
    from app.extensions import db

    with app.app_context():
        attempts = db.session.execute(text("SELECT * FROM delivery_attempts")).all()
    stored_results = _stored_results(app)
    assert len(attempts) == 8
    assert stored_results.count("auth_failed") >= 4  # the results are there, and were read
    haystack = " ".join(published) + repr(attempts) + stored_results
    for secret in SECRET_VALUES:
        assert secret not in haystack


def test_provider_answers_echoing_a_secret_are_scrubbed(client, host, peers, monkeypatch):
    connector = create_connector(client, host, "telegram", peers=peers)
    peers.telegram.mode = "reject"
    monkeypatch.setattr(
        peers.telegram,
        "answer",
        lambda *a: (
            400,
            {"ok": False, "error_code": 400, "description": f"Bad Request: token {TELEGRAM_TOKEN} is bad"},
        ),
    )
    response = send_test(client, host, connector["id"], "123456789")
    assert response.status_code == 502
    text_of_response = response.get_data(as_text=True).lower()
    assert TELEGRAM_TOKEN.lower() not in text_of_response
    assert TELEGRAM_TOKEN.partition(":")[2].lower() not in text_of_response
    assert "[redacted]" in response.get_json()["message"]


def test_is_verified_follows_the_latest_provider_verdict(client, host, peers):
    connector = create_connector(client, host, "sms", peers=peers)
    assert send_test(client, host, connector["id"], "+14155550199").status_code == 200
    assert connector_state(client, host, connector["id"])["is_verified"] is True
    peers.twilio.mode = "auth"  # a verdict on the connector (a refused recipient is none: tests/test_verdicts.py)
    assert send_test(client, host, connector["id"], "+14155550199").status_code == 502
    assert connector_state(client, host, connector["id"])["is_verified"] is False
    peers.twilio.mode = "ok"
    assert send_test(client, host, connector["id"], "+14155550199").status_code == 200
    assert connector_state(client, host, connector["id"])["is_verified"] is True


def test_test_endpoint_is_limited_to_10_per_hour_per_host(client, host, peers):
    connector = create_connector(client, host, "telegram", peers=peers)
    for _ in range(10):
        assert send_test(client, host, connector["id"], "not a chat").status_code == 400
    limited = send_test(client, host, connector["id"], "123456789")
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers


def _mark_verified(app, connector_id: str) -> None:
    from app.extensions import db

    with app.app_context():
        marked = db.session.execute(
            text("UPDATE connectors SET is_verified = :v WHERE id = :id"), {"v": True, "id": db_id(app, connector_id)}
        ).rowcount
        db.session.commit()
    assert marked == 1, f"connector {connector_id} was not marked verified"  # else 'unverify' would prove nothing


def _stored_results(app) -> str:
    """Every value the result backend holds, as text."""
    if USES_REDIS:
        import redis

        client = redis.Redis.from_url(app.config["REDIS_URL"])
        return " ".join(repr(client.get(key)) for key in client.keys("celery-task-meta-*"))
    from sqlalchemy import create_engine

    engine = create_engine(app.config["CELERY"]["result_backend"].removeprefix("db+"))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM celery_taskmeta")).all()
    engine.dispose()
    return repr(rows)


def test_an_attempt_is_claimed_once(app, client, host):
    from app.attempts import DeliveryAttempt
    from app.deliveries.jobs import claim_probe
    from app.extensions import db

    connector = create_connector(client, host, "telegram")
    attempt_id = uuid.uuid4()
    with app.app_context():
        db.session.add(DeliveryAttempt(id=attempt_id, connector_id=uuid.UUID(connector["id"]), destination="***789"))
        db.session.commit()
        job = claim_probe(attempt_id)
        assert job is not None and str(job.connector_id) == connector["id"] and job.connector_type == "telegram"
        assert job.config["bot_token"] == config_for("telegram")["bot_token"]
        assert claim_probe(attempt_id) is None
        assert claim_probe(uuid.uuid4()) is None


def test_a_job_celery_revoked_on_expiry_answers_timeout_at_once(app, client, host, peers):
    """The job reached a worker after its expiry (a backlog, say): Celery revokes it and says so; the caller is
    told `timeout` then, not `worker_error`, and not after waiting out the whole deadline."""
    from datetime import UTC, datetime, timedelta

    connector = create_connector(client, host, "telegram", peers=peers)

    def expired_on_arrival(headers=None, **_):  # noqa: ANN001, ANN202
        if headers and headers.get("task") == "deliveries.send_test":
            headers["expires"] = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()

    before_task_publish.connect(expired_on_arrival, weak=False)
    try:
        started = time.monotonic()
        response = send_test(client, host, connector["id"], DESTINATIONS["telegram"])
        answered_in = time.monotonic() - started
    finally:
        before_task_publish.disconnect(expired_on_arrival)
    body = response.get_json()
    assert response.status_code == 502 and body["error_code"] == "timeout", body
    assert answered_in < app.config["TEST_DELIVERY_TIMEOUT"] / 2
    assert peers.telegram.received == []
    [attempt] = client.get(f"/api/connectors/{connector['id']}/deliveries", headers=host.headers).get_json()[
        "deliveries"
    ]
    assert attempt["status"] == "timeout"
