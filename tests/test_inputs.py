"""Odd input: oversized, deeply nested, control characters, bad patterns and limits, hostile provider answers."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid

import pytest

from app.channels.base import DeliveryError, ProviderSettings
from app.channels.email import EmailProvider
from app.deliveries.jobs import TEST_MESSAGE
from tests.conftest import config_for, create_connector
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
