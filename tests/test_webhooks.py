"""Providers' receipts: real signed callbacks (Twilio's RequestValidator, Meta's HMAC-SHA256) sent to the app.

The attempts the callbacks name are written as the dispatch records them (a provider's id on a sent attempt),
so that these tests need no worker and no provider.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from twilio.request_validator import RequestValidator
from werkzeug.test import TestResponse

from app.attempts import DeliveryAttempt
from app.extensions import db
from tests.conftest import TWILIO_ACCOUNT_SID, Host, config_for, new_host

BASE_URL = "https://connectors.example.org"
AUTH_TOKEN = "twilio-auth-token-3e7f1a9c55"
APP_SECRET = "meta-app-secret-9b24d1e07a"
VERIFY_TOKEN = "meta-verify-token-51c8aa3f6e"
SECRETS = (AUTH_TOKEN, APP_SECRET, VERIFY_TOKEN)
REFUSAL = {"code": 403, "status": "Forbidden", "message": "Not accepted"}


@pytest.fixture
def public_url(app: Flask) -> Iterator[str]:
    """The service's public address, as providers reach it (the web reads it on each request)."""
    saved = app.config["PUBLIC_BASE_URL"]
    app.config["PUBLIC_BASE_URL"] = BASE_URL
    yield BASE_URL
    app.config["PUBLIC_BASE_URL"] = saved


@pytest.fixture
def no_public_url(app: Flask) -> Iterator[None]:
    saved = app.config["PUBLIC_BASE_URL"]
    app.config["PUBLIC_BASE_URL"] = None
    yield
    app.config["PUBLIC_BASE_URL"] = saved


def without_none(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if value is not None}


def sms_connector(client: FlaskClient, host: Host, name: str = "sms", **config: Any) -> dict[str, Any]:
    overrides = {"auth_token": AUTH_TOKEN, **config}
    # None leaves the field out: a connector without that secret.
    body = {"type": "sms", "name": name, "config": without_none(config_for("sms", **overrides))}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def whatsapp_connector(client: FlaskClient, host: Host, name: str = "whatsapp", **config: Any) -> dict[str, Any]:
    overrides = {"app_secret": APP_SECRET, "webhook_verify_token": VERIFY_TOKEN, **config}
    # None leaves the field out: a connector without that secret.
    body = {"type": "whatsapp", "name": name, "config": without_none(config_for("whatsapp", **overrides))}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def sent_attempt(app: Flask, connector: dict[str, Any], provider_message_id: str) -> uuid.UUID:
    """An attempt the provider accepted and named, as the worker records it."""
    with app.app_context():
        attempt = DeliveryAttempt(
            connector_id=uuid.UUID(connector["id"]), connector_type=connector["type"], kind="test", status="sent",
            destination="+1415*****99", provider_message_id=provider_message_id,
        )  # fmt: skip
        db.session.add(attempt)
        db.session.commit()
        return attempt.id


def attempt_state(app: Flask, attempt_id: uuid.UUID) -> dict[str, Any]:
    with app.app_context():
        row = db.session.get(DeliveryAttempt, attempt_id)
        assert row is not None
        return {
            "status": row.status,
            "receipt": row.receipt,
            "receipt_at": row.receipt_at,
            "error_code": row.error_code,
            "message": row.message,
        }


def twilio_url(connector_id: str) -> str:
    return f"{BASE_URL}/api/webhooks/twilio/{connector_id}"


def status_callback(sid: str, status: str, **extra: str) -> dict[str, str]:
    """The form Twilio posts to a StatusCallback."""
    return {
        "MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
        "AccountSid": TWILIO_ACCOUNT_SID, "From": "+14155550100", "To": "+14155550199", "ApiVersion": "2010-04-01",
        **extra,
    }  # fmt: skip


def post_twilio(
    client: FlaskClient,
    connector_id: str,
    form: dict[str, str],
    *,
    token: str = AUTH_TOKEN,
    signed_url: str | None = None,
    signature: str | None = None,
    **kwargs: Any,
) -> TestResponse:
    """POST a status callback signed as Twilio signs it: the URL it was given and the form's fields."""
    if signature is None:
        signature = RequestValidator(token).compute_signature(signed_url or twilio_url(connector_id), form)
    headers = {"X-Twilio-Signature": signature} if signature else {}
    return client.post(f"/api/webhooks/twilio/{connector_id}", data=form, headers=headers, **kwargs)


def sid() -> str:
    return "SM" + uuid.uuid4().hex


def wamid() -> str:
    return "wamid.HBgLMTQxNTU1NTAxOTkVAgARGBI" + uuid.uuid4().hex.upper()


def meta_signature(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def whatsapp_status(message_id: Any, status: Any, **extra: Any) -> dict[str, Any]:
    return {"id": message_id, "status": status, "timestamp": "1733300000", "recipient_id": "14155550199", **extra}


def whatsapp_payload(*statuses: dict[str, Any]) -> dict[str, Any]:
    """A WhatsApp Business Account webhook call, as Meta posts it."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "106540352242922"},
        "statuses": list(statuses),
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "987654321098765", "changes": [{"value": value, "field": "messages"}]}],
    }


def post_whatsapp(
    client: FlaskClient, connector_id: str, body: bytes | dict[str, Any], *, signature: str | None = None
) -> TestResponse:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"X-Hub-Signature-256": meta_signature(raw) if signature is None else signature}
    if signature == "":
        headers = {}
    return client.post(
        f"/api/webhooks/whatsapp/{connector_id}", data=raw, content_type="application/json", headers=headers
    )


def handshake(client: FlaskClient, connector_id: str, **params: str) -> TestResponse:
    query = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444", **params}
    return client.get(f"/api/webhooks/whatsapp/{connector_id}", query_string=query)


# --- Twilio ------------------------------------------------------------------------------------------------------


def test_a_signed_delivered_callback_records_the_receipt_on_the_attempt_it_names(app, client, host, public_url):
    connector = sms_connector(client, host)
    message_sid = sid()
    attempt = sent_attempt(app, connector, message_sid)
    response = post_twilio(client, connector["id"], status_callback(message_sid, "delivered"))
    assert response.status_code == 204, response.get_json()
    state = attempt_state(app, attempt)
    assert state["receipt"] == "delivered" and state["receipt_at"] is not None
    assert state["status"] == "sent" and state["error_code"] is None


@pytest.mark.parametrize("status", ["undelivered", "failed"])
def test_undelivered_and_failed_record_undelivered_with_twilios_code_and_words(app, client, host, public_url, status):
    connector = sms_connector(client, host)
    message_sid = sid()
    attempt = sent_attempt(app, connector, message_sid)
    response = post_twilio(client, connector["id"], status_callback(message_sid, status, ErrorCode="30003"))
    assert response.status_code == 204
    state = attempt_state(app, attempt)
    assert state["receipt"] == "undelivered" and state["error_code"] == "undelivered"
    assert "30003" in state["message"] and "Unreachable destination handset" in state["message"]


@pytest.mark.parametrize("status", ["queued", "sending", "sent", "accepted", "scheduled"])
def test_statuses_short_of_a_receipt_change_nothing(app, client, host, public_url, status):
    connector = sms_connector(client, host)
    message_sid = sid()
    attempt = sent_attempt(app, connector, message_sid)
    assert post_twilio(client, connector["id"], status_callback(message_sid, status)).status_code == 204
    assert attempt_state(app, attempt)["receipt"] is None


def test_a_valid_callback_naming_nothing_known_still_answers_2xx(app, client, host, public_url):
    connector = sms_connector(client, host)
    attempt = sent_attempt(app, connector, sid())
    response = post_twilio(client, connector["id"], status_callback(sid(), "delivered"))
    assert response.status_code == 204  # Twilio would try again otherwise
    assert attempt_state(app, attempt)["receipt"] is None


def test_an_account_sid_used_as_the_key_signs_with_its_secret(app, client, host, public_url):
    connector = sms_connector(client, host, api_key_sid=TWILIO_ACCOUNT_SID, auth_token=None)
    message_sid = sid()
    attempt = sent_attempt(app, connector, message_sid)
    token = config_for("sms")["api_key_secret"]
    response = post_twilio(client, connector["id"], status_callback(message_sid, "delivered"), token=token)
    assert response.status_code == 204
    assert attempt_state(app, attempt)["receipt"] == "delivered"


def _refusals(app: Flask, client: FlaskClient, host: Host) -> dict[str, TestResponse]:
    """Every way a Twilio callback is not believed, each aimed at a real attempt."""
    connector = sms_connector(client, host)
    api_key_only = sms_connector(client, host, name="api key only", auth_token=None)  # SK... key: cannot check
    whatsapp = whatsapp_connector(client, host)
    message_sid = sid()
    for each in (connector, api_key_only, whatsapp):
        sent_attempt(app, each, message_sid)
    form = status_callback(message_sid, "undelivered", ErrorCode="30003")
    tampered = RequestValidator(AUTH_TOKEN).compute_signature(twilio_url(connector["id"]), form)
    evil_url = f"https://evil.example/api/webhooks/twilio/{connector['id']}"
    key_secret = config_for("sms")["api_key_secret"]
    return {
        "forged": post_twilio(client, connector["id"], form, token="not-the-auth-token"),
        "missing": post_twilio(client, connector["id"], form, signature=""),
        "garbage": post_twilio(client, connector["id"], form, signature="x" * 28),
        "fields changed after signing": post_twilio(
            client, connector["id"], {**form, "MessageStatus": "delivered"}, signature=tampered
        ),
        # The Host header is the caller's to choose: a signature over the URL it names proves nothing.
        "over the Host header's URL": post_twilio(
            client, connector["id"], form, signed_url=evil_url, base_url="https://evil.example"
        ),
        "over http instead of https": post_twilio(
            client, connector["id"], form, signed_url=twilio_url(connector["id"]).replace("https:", "http:", 1)
        ),
        "unknown connector": post_twilio(client, str(uuid.uuid4()), form),
        "api key without auth token": post_twilio(client, api_key_only["id"], form, token=key_secret),
        "a whatsapp connector": post_twilio(client, whatsapp["id"], form),
    }


def test_every_refusal_is_the_same_403_and_changes_nothing(app, client, host, public_url, caplog):
    caplog.set_level(logging.DEBUG)
    answers = _refusals(app, client, host)
    for why, response in answers.items():
        assert (response.status_code, response.get_json()) == (403, REFUSAL), why
    with app.app_context():
        receipts = db.session.scalars(db.select(DeliveryAttempt.receipt)).all()
    assert len(receipts) == 3 and set(receipts) == {None}
    assert "receipt refused" in caplog.text  # the operator learns why; the caller does not
    for secret in (*SECRETS, config_for("sms")["api_key_secret"]):
        assert secret not in caplog.text


def test_without_a_public_base_url_every_route_refuses(app, client, host, no_public_url):
    connector = sms_connector(client, host)
    whatsapp = whatsapp_connector(client, host)
    message_sid, message_wamid = sid(), wamid()
    attempts = [sent_attempt(app, connector, message_sid), sent_attempt(app, whatsapp, message_wamid)]
    answers = [
        post_twilio(client, connector["id"], status_callback(message_sid, "delivered")),
        post_whatsapp(client, whatsapp["id"], whatsapp_payload(whatsapp_status(message_wamid, "delivered"))),
        handshake(client, whatsapp["id"]),
    ]
    assert [(a.status_code, a.get_json()) for a in answers] == [(403, REFUSAL)] * 3
    assert [attempt_state(app, each)["receipt"] for each in attempts] == [None, None]


def test_a_callback_touches_only_its_own_connectors_attempts(app, client, host, public_url):
    mine = sms_connector(client, host, name="mine")
    other_host = new_host()
    theirs = sms_connector(client, other_host, name="theirs", auth_token="their-auth-token-0c6b2e")
    their_sid = sid()
    their_attempt = sent_attempt(app, theirs, their_sid)
    # Signed correctly for `mine`, naming `theirs`' message: taken, and nothing of theirs changes.
    named = post_twilio(client, mine["id"], status_callback(their_sid, "undelivered", ErrorCode="30005"))
    assert named.status_code == 204
    # Their signature on my address: not believed.
    misdirected = post_twilio(
        client, mine["id"], status_callback(their_sid, "undelivered"), token="their-auth-token-0c6b2e",
        signed_url=twilio_url(theirs["id"]),
    )  # fmt: skip
    assert misdirected.status_code == 403
    assert attempt_state(app, their_attempt)["receipt"] is None
    # Theirs, on their address with their token, is theirs.
    assert post_twilio(
        client, theirs["id"], status_callback(their_sid, "delivered"), token="their-auth-token-0c6b2e"
    ).status_code == 204
    assert attempt_state(app, their_attempt)["receipt"] == "delivered"


def test_receipts_only_move_forward_whatever_the_order_or_repetition(app, client, host, public_url):
    connector = sms_connector(client, host)
    message_sid = sid()
    attempt = sent_attempt(app, connector, message_sid)
    assert post_twilio(client, connector["id"], status_callback(message_sid, "delivered")).status_code == 204
    first = attempt_state(app, attempt)
    assert post_twilio(client, connector["id"], status_callback(message_sid, "delivered")).status_code == 204
    assert attempt_state(app, attempt) == first  # a duplicate changes nothing, not even when
    assert post_twilio(client, connector["id"], status_callback(message_sid, "read")).status_code == 204
    assert attempt_state(app, attempt)["receipt"] == "read"
    for late in ("delivered", "sent", "undelivered"):
        assert post_twilio(client, connector["id"], status_callback(message_sid, late)).status_code == 204
        state = attempt_state(app, attempt)
        assert (state["receipt"], state["error_code"]) == ("read", None), late


@pytest.mark.parametrize(
    "form",
    [
        {"MessageStatus": "delivered"},
        {"MessageSid": "SM" + "0" * 32},
        {"MessageSid": "has spaces in it", "MessageStatus": "delivered"},
        {"MessageSid": "SM" + "0" * 200, "MessageStatus": "delivered"},
        {"MessageSid": "SM" + "0" * 32, "MessageStatus": "Delivered!"},
        {},
    ],
)
def test_a_signed_callback_without_a_usable_sid_or_status_is_a_400(app, client, host, public_url, form):
    connector = sms_connector(client, host)
    response = post_twilio(client, connector["id"], form)
    assert response.status_code == 400 and response.is_json
    assert response.get_json()["message"] == "Not a Twilio status callback"


def test_a_twilio_body_over_the_limit_is_a_413(app, client, host, public_url):
    connector = sms_connector(client, host)
    form = status_callback(sid(), "delivered", Padding="x" * (65 * 1024))
    assert post_twilio(client, connector["id"], form).status_code == 413
    chunked = client.post(
        f"/api/webhooks/twilio/{connector['id']}",
        input_stream=io.BytesIO(b"MessageSid=SM1&Padding=" + b"x" * (2 * 1024 * 1024)),
        content_type="application/x-www-form-urlencoded",
        environ_overrides={"wsgi.input_terminated": True},  # what gunicorn says of a chunked body
    )
    assert chunked.status_code == 413 and chunked.is_json


# --- WhatsApp ----------------------------------------------------------------------------------------------------


def test_the_handshake_answers_the_challenge_as_plain_text(client, host, public_url):
    connector = whatsapp_connector(client, host)
    response = handshake(client, connector["id"])
    assert response.status_code == 200
    assert response.mimetype == "text/plain" and response.get_data(as_text=True) == "1158201444"


@pytest.mark.parametrize(
    "params",
    [
        {"hub.verify_token": "not-the-verify-token"},
        {"hub.verify_token": VERIFY_TOKEN[:-1]},
        {"hub.verify_token": ""},
        {"hub.mode": "unsubscribe"},
        {"hub.mode": ""},
    ],
)
def test_a_handshake_without_the_verify_token_or_the_subscribe_mode_is_refused(client, host, public_url, params):
    connector = whatsapp_connector(client, host)
    response = handshake(client, connector["id"], **params)
    assert (response.status_code, response.get_json()) == (403, REFUSAL)


def test_a_handshake_is_refused_when_the_connector_cannot_check_what_follows(client, host, public_url):
    no_token = whatsapp_connector(client, host, name="no verify token", webhook_verify_token=None)
    no_secret = whatsapp_connector(client, host, name="no app secret", app_secret=None)
    sms = sms_connector(client, host)
    for connector_id in (no_token["id"], no_secret["id"], sms["id"], str(uuid.uuid4())):
        response = handshake(client, connector_id)
        assert (response.status_code, response.get_json()) == (403, REFUSAL), connector_id


def test_a_handshake_with_an_unusable_challenge_is_a_400(client, host, public_url):
    connector = whatsapp_connector(client, host)
    for challenge in ("", "x" * 257, "caf\u00e9", "line\nbreak"):
        assert handshake(client, connector["id"], **{"hub.challenge": challenge}).status_code == 400, challenge


def test_signed_statuses_record_delivered_read_and_failed(app, client, host, public_url):
    connector = whatsapp_connector(client, host)
    delivered, read, failed, sent = wamid(), wamid(), wamid(), wamid()
    attempts = {each: sent_attempt(app, connector, each) for each in (delivered, read, failed, sent)}
    error = {
        "code": 131026, "title": "Message undeliverable", "message": "Message undeliverable",
        "error_data": {"details": "Message Undeliverable."},
    }  # fmt: skip
    payload = whatsapp_payload(
        whatsapp_status(delivered, "delivered"),
        whatsapp_status(read, "read"),
        whatsapp_status(failed, "failed", errors=[error]),
        whatsapp_status(sent, "sent"),
        whatsapp_status(wamid(), "delivered"),  # another connector's, or long forgotten
    )
    response = post_whatsapp(client, connector["id"], payload)
    assert response.status_code == 200 and response.get_json() == {"recorded": 3}
    states = {each: attempt_state(app, attempt) for each, attempt in attempts.items()}
    assert [states[each]["receipt"] for each in (delivered, read, failed, sent)] == [
        "delivered", "read", "undelivered", None
    ]  # fmt: skip
    assert states[failed]["error_code"] == "undelivered"
    assert "131026" in states[failed]["message"] and "Message undeliverable" in states[failed]["message"]


def test_meta_calls_without_statuses_are_taken(client, host, public_url):
    connector = whatsapp_connector(client, host)
    incoming = whatsapp_payload()
    incoming["entry"][0]["changes"][0]["value"] = {"messages": [{"from": "14155550199", "type": "text"}]}
    for payload in (incoming, whatsapp_payload(), {"object": "whatsapp_business_account", "entry": []}):
        response = post_whatsapp(client, connector["id"], payload)
        assert response.status_code == 200 and response.get_json() == {"recorded": 0}


def test_a_status_for_another_connectors_wamid_changes_nothing(app, client, host, public_url):
    mine = whatsapp_connector(client, host, name="mine")
    theirs = whatsapp_connector(client, new_host(), name="theirs", app_secret="their-app-secret-77d1")
    their_wamid = wamid()
    their_attempt = sent_attempt(app, theirs, their_wamid)
    response = post_whatsapp(client, mine["id"], whatsapp_payload(whatsapp_status(their_wamid, "failed")))
    assert response.status_code == 200 and response.get_json() == {"recorded": 0}
    assert attempt_state(app, their_attempt)["receipt"] is None


def test_a_meta_call_without_the_app_secrets_signature_is_refused(app, client, host, public_url):
    connector = whatsapp_connector(client, host)
    no_secret = whatsapp_connector(client, host, name="no app secret", app_secret=None)
    message_wamid = wamid()
    attempt = sent_attempt(app, connector, message_wamid)
    sent_attempt(app, no_secret, message_wamid)
    body = json.dumps(whatsapp_payload(whatsapp_status(message_wamid, "failed"))).encode()
    other_body = json.dumps(whatsapp_payload(whatsapp_status(message_wamid, "delivered"))).encode()
    bare_hex = meta_signature(body).removeprefix("sha256=")
    answers = {
        "missing": post_whatsapp(client, connector["id"], body, signature=""),
        "wrong secret": post_whatsapp(client, connector["id"], body, signature=meta_signature(body, "other-secret")),
        "another body's": post_whatsapp(client, connector["id"], body, signature=meta_signature(other_body)),
        "without sha256=": post_whatsapp(client, connector["id"], body, signature=bare_hex),
        "sha1": post_whatsapp(
            client, connector["id"], body,
            signature="sha1=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha1).hexdigest(),
        ),
        "no app secret": post_whatsapp(client, no_secret["id"], body, signature=meta_signature(body, "")),
        "an sms connector": post_whatsapp(client, sms_connector(client, host)["id"], body),
        "unknown connector": post_whatsapp(client, str(uuid.uuid4()), body),
    }  # fmt: skip
    for why, response in answers.items():
        assert (response.status_code, response.get_json()) == (403, REFUSAL), why
    assert attempt_state(app, attempt)["receipt"] is None


def test_the_signature_is_checked_before_the_body_is_read(client, host, public_url):
    connector = whatsapp_connector(client, host)
    response = post_whatsapp(client, connector["id"], b"{not json", signature="sha256=" + "0" * 64)
    assert (response.status_code, response.get_json()) == (403, REFUSAL)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"",
        b"\xff\xfe{}",
        b"[]",
        b'"entry"',
        b"[" * 60_000,  # nested too deeply, within the size limit
        json.dumps({"entry": {"changes": []}}).encode(),
        json.dumps({"entry": ["not an object"]}).encode(),
        json.dumps({"entry": [{"changes": "none"}]}).encode(),
        json.dumps({"entry": [{"changes": [{"value": ["statuses"]}]}]}).encode(),
        json.dumps(whatsapp_payload() | {"entry": [{"changes": [{"value": {"statuses": {"id": "x"}}}]}]}).encode(),
        json.dumps(whatsapp_payload(whatsapp_status(12345, "delivered"))).encode(),
        json.dumps(whatsapp_payload(whatsapp_status(None, "delivered"))).encode(),
        json.dumps(whatsapp_payload(whatsapp_status("wamid.ok", ["delivered"]))).encode(),
        json.dumps(whatsapp_payload(whatsapp_status("wamid.ok", "failed", errors="boom"))).encode(),
        json.dumps(whatsapp_payload(whatsapp_status("wamid.ok", "failed", errors=[{"code": {"n": 1}}]))).encode(),
        json.dumps(whatsapp_payload(whatsapp_status("wamid.ok", "failed", errors=[{"title": 7}]))).encode(),
    ],
    ids=lambda body: body[:40].decode(errors="replace"),
)
def test_signed_junk_and_wrong_types_are_a_400_never_a_500(app, client, host, public_url, body):
    connector = whatsapp_connector(client, host)
    response = post_whatsapp(client, connector["id"], body)
    assert response.status_code == 400 and response.is_json, response.data[:200]
    assert response.get_json()["message"].startswith("Not a WhatsApp webhook payload")


def test_a_payload_with_one_bad_status_records_none_of_them(app, client, host, public_url):
    connector = whatsapp_connector(client, host)
    good = wamid()
    attempt = sent_attempt(app, connector, good)
    payload = whatsapp_payload(whatsapp_status(good, "delivered"), whatsapp_status(["not", "an", "id"], "read"))
    assert post_whatsapp(client, connector["id"], payload).status_code == 400
    assert attempt_state(app, attempt)["receipt"] is None


def test_a_meta_body_over_the_limit_is_a_413(client, host, public_url):
    connector = whatsapp_connector(client, host)
    statuses = [whatsapp_status(wamid(), "sent") for _ in range(1000)]
    body = json.dumps(whatsapp_payload(*statuses)).encode()
    assert len(body) > 64 * 1024
    response = post_whatsapp(client, connector["id"], body)
    assert response.status_code == 413 and response.is_json
    chunked = client.post(
        f"/api/webhooks/whatsapp/{connector['id']}",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers={"X-Hub-Signature-256": meta_signature(body)},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert chunked.status_code == 413 and chunked.is_json


def test_no_secret_or_body_reaches_the_logs(app, client, host, public_url, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    connector = whatsapp_connector(client, host)
    marker = wamid()
    sent_attempt(app, connector, marker)
    body = whatsapp_payload(whatsapp_status(marker, "failed", errors=[{"code": 131026, "title": "Undeliverable"}]))
    assert post_whatsapp(client, connector["id"], body).status_code == 200
    assert post_whatsapp(client, connector["id"], body, signature="sha256=" + "0" * 64).status_code == 403
    assert handshake(client, connector["id"]).status_code == 200
    logged = caplog.text + capsys.readouterr().out
    assert "/api/webhooks/whatsapp/" in logged  # the request lines were captured
    for secret in (*SECRETS, marker):
        assert secret not in logged


# --- Shared ------------------------------------------------------------------------------------------------------


def test_a_flood_on_one_connector_is_limited_without_touching_another(app, client, host, public_url):
    flooded = sms_connector(client, host, name="flooded")
    other = whatsapp_connector(client, host)
    form = status_callback(sid(), "delivered")
    answers = [post_twilio(client, flooded["id"], form, token="forged").status_code for _ in range(601)]
    assert answers[:600] == [403] * 600 and answers[600] == 429
    assert post_twilio(client, flooded["id"], form).status_code == 429  # even a genuine one, until the window ends
    limited = handshake(client, flooded["id"])
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert handshake(client, other["id"]).status_code == 200


def test_the_callbacks_are_documented_without_a_token(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    operations = {
        ("/api/webhooks/twilio/{connector_id}", "post"): "204",
        ("/api/webhooks/whatsapp/{connector_id}", "get"): "200",
        ("/api/webhooks/whatsapp/{connector_id}", "post"): "200",
    }
    for (path, method), success in operations.items():
        operation = paths[path][method]
        assert operation["security"] == [], (path, method)
        assert {success, "400", "403", "429", "503"} <= set(operation["responses"]), (path, method)
        assert "PUBLIC_BASE_URL" in operation["responses"]["403"]["description"]
    assert "text/plain" in paths["/api/webhooks/whatsapp/{connector_id}"]["get"]["responses"]["200"]["content"]
