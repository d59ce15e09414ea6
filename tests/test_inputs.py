"""Odd input: oversized, deeply nested, control characters, bad patterns and limits, hostile provider answers."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid
from typing import Any

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from app.channels.base import DeliveryError, ProviderSettings
from app.channels.email import EmailProvider
from app.deliveries.jobs import TEST_MESSAGE
from tests.conftest import config_for, create_connector, service_headers
from tests.support import DESTINATIONS, send_test


def test_bodies_over_64_kib_are_413_json(client, host):
    response = client.post(
        "/api/connectors", data=b"{" + b" " * (70 * 1024) + b"}", content_type="application/json", headers=host.headers
    )
    assert response.status_code == 413
    assert response.get_json()["code"] == 413


def test_deeply_nested_json_is_a_clear_400(client, host):
    body = '{"type": "email", "name": "x", "config": ' + "[" * 30000 + "]" * 30000 + "}"
    response = client.post("/api/connectors", data=body, content_type="application/json", headers=host.headers)
    assert response.status_code == 400
    assert response.get_json()["code"] == 400


@pytest.mark.parametrize("name", ["line\nbreak", "nul\x00byte", "bell\x07", "del\x7f"])
def test_control_characters_in_names_are_rejected_clearly(client, host, name):
    response = client.post(
        "/api/connectors", json={"type": "email", "name": name, "config": config_for("email")}, headers=host.headers
    )
    assert response.status_code == 400
    assert response.get_json()["errors"]["json"]["name"] == [
        "Must not contain control, format or line-separator characters."
    ]


def test_bad_limits_are_400(client, host):
    connector = create_connector(client, host, "email")
    for query in ("limit=-1", "limit=101", "limit=1.5", "limit="):
        assert (
            client.get(f"/api/connectors/{connector['id']}/deliveries?{query}", headers=host.headers).status_code == 400
        )


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("sms", "api_key_sid", "SK" + "a" * 32 + "\n"),
        ("sms", "account_sid", "AC" + "b" * 32 + "\n"),
        ("whatsapp", "phone_number_id", "106540352242922\n"),
        ("whatsapp", "api_version", "v24.0\n"),
        ("telegram", "bot_token", "7012345678:AAHtgSecretToken4b2d9e8f1a3c5d7e\n"),
    ],
)
def test_a_trailing_newline_does_not_pass_a_pattern(client, host, kind, field, value):
    body = {"type": kind, "name": "x", "config": config_for(kind, **{field: value})}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]["json"]["config"]


@pytest.mark.parametrize("where", ["name", "config"])
def test_lone_surrogates_are_a_clear_400(client, host, where):
    name = '"\\udfff"' if where == "name" else '"ok"'
    username = '"\\udfff"' if where == "config" else '"mailer"'
    body = (
        '{"type": "email", "name": ' + name + ', "config": {"smtp_host": "smtp.example.com", "smtp_port": 587, '
        '"username": ' + username + ', "password": "p", "from_address": "a@example.org"}}'
    )
    response = client.post("/api/connectors", data=body, content_type="application/json", headers=host.headers)
    assert response.status_code == 400
    assert "not valid Unicode" in response.get_json()["message"]


def test_a_server_trickling_endless_replies_is_cut_off_at_the_provider_timeout():
    """A hostile SMTP host must not hold a worker thread: the whole dialogue ends at the deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            while not stop.is_set():
                try:
                    conn.sendall(b"220-still greeting you\r\n")
                except OSError:
                    return
                time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    provider = EmailProvider(ProviderSettings(timeout=1.0, allow_private=True))
    config = {
        **config_for("email"),
        "smtp_host": "127.0.0.1",
        "smtp_port": listener.getsockname()[1],
        "security": "none",
    }
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryError) as raised:
            provider.send(config, "survivor@example.org", TEST_MESSAGE)
    finally:
        stop.set()
        listener.close()
    assert raised.value.code == "provider_unreachable"
    assert time.monotonic() - started < 2.5


MALFORMED = {
    "telegram": [
        (200, {"ok": False}),
        (200, {"ok": True, "result": {}}),
        (200, [1, 2]),
        (502, b"<html>Bad Gateway</html>"),
    ],
    "whatsapp": [(200, {"messages": "x"}), (200, b"not json"), (400, {"error": {"code": 1e300, "message": "m"}})],
    "sms": [(201, [1]), (201, b"null"), (400, {"code": "x", "message": "m", "status": 400})],
}


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(("kind", "status", "payload"), [(k, s, p) for k, cases in MALFORMED.items() for s, p in cases])
def test_malformed_provider_answers_are_provider_errors(client, host, peers, monkeypatch, kind, status, payload):
    peer = {"sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram}[kind]
    real_answer = peer.answer

    def answer(method, path, headers, body):  # noqa: ANN001, ANN202
        if path.endswith("/getMe"):
            return real_answer(method, path, headers, body)
        return status, payload

    monkeypatch.setattr(peer, "answer", answer)
    connector = create_connector(client, host, kind, peers=peers)
    response = send_test(client, host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 502
    assert response.get_json()["error_code"] == "provider_error", response.get_json()


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [("email", "password", "pässword"), ("email", "username", "jösé"), ("sms", "api_key_secret", "sécret"),
     ("whatsapp", "access_token", "tøken"), ("whatsapp", "access_token", "tok\nen")],
)  # fmt: skip
def test_credentials_that_no_provider_could_carry_are_refused_at_save(client, host, kind, field, value):
    body = {"type": kind, "name": "x", "config": config_for(kind, **{field: value})}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]["json"]["config"]


@pytest.mark.parametrize("field", ["priority", "smtp_port"])
def test_an_integer_too_long_for_python_to_read_is_400(client, host, field):
    digits = "9" * 5000  # past Python's int-string limit (4,300 digits)
    config = json.dumps(config_for("email"))
    if field == "priority":
        body = f'{{"type": "email", "name": "n", "priority": {digits}, "config": {config}}}'
    else:
        body = f'{{"type": "email", "name": "n", "config": {config.replace("587", digits)}}}'
    response = client.post("/api/connectors", data=body, content_type="application/json", headers=host.headers)
    assert response.status_code == 400 and response.is_json, response.data[:200]


def test_a_chunked_body_over_the_limit_without_content_length_is_413(client, host):
    body = io.BytesIO(b'{"name": "' + b"x" * (10 * 1024 * 1024) + b'"}')
    response = client.post(
        "/api/connectors",
        input_stream=body,
        content_type="application/json",
        headers=host.headers,
        environ_overrides={"wsgi.input_terminated": True},  # what gunicorn says of a chunked body
    )
    assert response.status_code == 413 and response.is_json


@pytest.mark.parametrize(
    "name",
    ["Name\u200b", "Na\u00adme", "right\u202eleft", "line\u2028sep", "para\u2029sep", "bom\ufeff", "joiner\u2060"],
)
def test_invisible_and_layout_characters_in_names_are_400(client, host, name):
    response = client.post(
        "/api/connectors", json={"type": "email", "name": name, "config": config_for("email")}, headers=host.headers
    )
    assert response.status_code == 400
    assert response.get_json()["errors"]["json"]["name"] == [
        "Must not contain control, format or line-separator characters."
    ]


def test_names_are_stored_in_nfc_so_lookalikes_collide_and_case_still_counts(client, host):
    composed = create_connector(client, host, "email", "Caf\u00e9")
    assert composed["name"] == "Caf\u00e9"
    decomposed = client.post(
        "/api/connectors",
        json={"type": "email", "name": "Cafe\u0301", "config": config_for("email")},
        headers=host.headers,
    )
    assert decomposed.status_code == 409
    assert create_connector(client, host, "email", "CAF\u00c9")["name"] == "CAF\u00c9"  # case-sensitive


def test_a_hosts_limit_is_one_whatever_the_spelling_of_its_uuid(client):
    from tests.conftest import make_token

    host = uuid.uuid4()
    spellings = [str(host), str(host).upper(), "{" + str(host) + "}", host.hex, "urn:uuid:" + str(host)]
    statuses = []
    for index in range(11):
        token = make_token(spellings[index % len(spellings)])
        body = {"type": "telegram", "name": f"t{index}", "config": config_for("telegram")}
        statuses.append(
            client.post("/api/connectors", json=body, headers={"Authorization": f"Bearer {token}"}).status_code
        )
    assert statuses == [201] * 10 + [429]


# --- a message that passes the API must not fail later on its words or addresses ---------------------------

ONE_LINE = "Must not contain control characters (such as CR, LF or NUL) or line separators."


def post_message(client: FlaskClient, host_id: uuid.UUID, **fields: Any) -> TestResponse:
    body = {"purpose": "notification", "recipient": {"email": "ana@example.org"}, "text": "Hello", **fields}
    headers = {**service_headers(), "Idempotency-Key": uuid.uuid4().hex}
    return client.post(f"/api/internal/hosts/{host_id}/messages", json=body, headers=headers)


def messages_of(client: FlaskClient, host_id: uuid.UUID) -> list[dict[str, Any]]:
    return client.get(f"/api/internal/hosts/{host_id}/messages", headers=service_headers()).get_json()["messages"]


@pytest.mark.parametrize(
    "subject", ["Hi\r\nBcc: eve@example.org", "Hi\n", "Hi\r", "tab\there", "nul\x00", "next\x85line", "line\u2028sep"]
)
def test_a_subject_with_a_line_break_or_control_character_is_400_not_a_worker_error(client, host, peers, subject):
    create_connector(client, host, "email", peers=peers)  # a route the message would take
    response = post_message(client, host.id, subject=subject)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["errors"]["json"]["subject"] == [ONE_LINE]
    assert messages_of(client, host.id) == []


@pytest.mark.parametrize("field", ["text", "html"])
def test_nul_in_a_messages_text_or_html_is_400(client, host, peers, field):
    create_connector(client, host, "email", peers=peers)
    response = post_message(client, host.id, **{field: "Your code\x00 is 482913"})
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["errors"]["json"][field] == ["Must not contain NUL characters."]
    assert messages_of(client, host.id) == []


def test_text_and_html_keep_their_line_breaks_and_tabs(client, host, peers):
    create_connector(client, host, "email", peers=peers)
    response = post_message(
        client, host.id, subject="Your code", text="Line one\r\nLine two\tend", html="<p>one</p>\n<p>two</p>"
    )
    assert response.status_code == 202, response.get_json()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "ana@example.org\n"),  # refused by email_validator itself: kept here should that change
        ("email", "ana@example.org\r\nBcc: eve@example.org"),
        ("email", "ana@example.org\x00"),
        ("phone", "+14155552671\n"),  # phonenumbers drops these and would take the number
        ("phone", "+14155552671\r"),
        ("phone", "+14155552671\x00"),
        ("phone", "+14155552671\t"),
        ("telegram_chat_id", "123456789\n"),  # trimmed by the chat id rule and taken
        ("telegram_chat_id", "@bapba_news\r"),
        ("telegram_chat_id", "123456789\u2029"),
    ],
)
def test_control_characters_in_a_recipients_address_are_400(client, host, peers, field, value):
    create_connector(client, host, "email", peers=peers)
    response = post_message(client, host.id, recipient={field: value})
    assert response.status_code == 400, response.get_json()
    assert field in response.get_json()["errors"]["json"]["recipient"]
    assert messages_of(client, host.id) == []


@pytest.mark.parametrize("body", [b"hello", b""], ids=["hello", "empty"])
@pytest.mark.parametrize("where", ["connectors", "messages"])
def test_a_body_that_is_not_json_is_400_saying_so(client, host, where, body):
    if where == "connectors":
        path, headers = "/api/connectors", host.headers
    else:
        path, headers = f"/api/internal/hosts/{host.id}/messages", {**service_headers(), "Idempotency-Key": "k1"}
    response = client.post(path, data=body, content_type="application/json", headers=headers)
    assert response.status_code == 400
    assert response.get_json()["message"] == "Request body is not JSON"
