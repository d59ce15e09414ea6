"""Secrets never leak: not into the logs, answers or attempt log, whatever the level, outcome or encoding."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from urllib.parse import quote, quote_plus

import pytest

from tests.conftest import SECRET_VALUES, config_for, create_connector
from tests.support import DESTINATIONS, send_test


def test_no_secret_reaches_the_logs_at_debug_level(app, client, host, peers, worker, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    for kind in ("email", "sms", "whatsapp", "telegram"):
        connector = create_connector(client, host, kind, peers=peers)
        assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 200
        peer = {"email": peers.smtp, "sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram}[kind]
        peer.mode = "auth"
        assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 502
        client.put(f"/api/connectors/{connector['id']}", json={"config": config_for(kind, peers)}, headers=host.headers)
    logged = caplog.text + capsys.readouterr().out
    worker_log = getattr(worker, "log_path", None)  # the subprocess worker of the Redis run
    if worker_log:
        time.sleep(0.5)
        logged += worker_log.read_text()
    assert "test delivery" in logged  # the worker's lines were captured too
    for secret in SECRET_VALUES:
        assert secret not in logged


SECRET = "s3cr3t-Pa55word"


def _base64_at(prefix: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(prefix + secret.encode() + b"-tail").decode()


@pytest.mark.parametrize("prefix", [b"", b"u", b"us", b"SK" + b"a" * 32 + b":", b"\0mailer\0"])
def test_a_secret_is_scrubbed_in_every_form_and_at_every_base64_alignment(prefix):
    from app.redact import REDACTED, scrub

    forms = [SECRET, quote(SECRET, safe=""), quote_plus(SECRET), _base64_at(prefix)]
    text = "provider said: " + " | ".join(forms)
    scrubbed = scrub(text, [SECRET])
    assert scrubbed is not None and scrubbed.count(REDACTED) >= len(forms)
    assert SECRET not in scrubbed and SECRET.lower() not in scrubbed.lower()
    for form in forms:
        assert form not in scrubbed
    # What is left of the base64 text no longer decodes to the secret, at any offset.
    for word in scrubbed.split():
        for start in range(4):
            try:
                decoded = base64.b64decode(word[start:] + "===", validate=False)
            except ValueError:
                continue
            assert SECRET.encode() not in decoded


def test_a_secret_too_short_to_scrub_drops_the_providers_text_instead_of_mangling_it():
    from app.redact import scrub

    assert scrub("SMTP server does not offer AUTH", ["er"]) is None


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("kind", ["sms", "whatsapp"])
def test_a_provider_echoing_the_credentials_in_base64_reaches_nobody(app, client, host, peers, kind, caplog):
    from tests.conftest import TWILIO_SECRET, WHATSAPP_TOKEN

    secret = TWILIO_SECRET if kind == "sms" else WHATSAPP_TOKEN
    connector = create_connector(client, host, kind, peers=peers)
    (peers.twilio if kind == "sms" else peers.whatsapp).mode = "echo"
    response = send_test(client, host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 502
    answer = json.dumps(response.get_json())
    listed = json.dumps(client.get(f"/api/connectors/{connector['id']}/deliveries", headers=host.headers).get_json())
    assert "[redacted]" in answer
    for where in (answer, listed, caplog.text):
        assert secret not in where
        for token in re.findall(r"[A-Za-z0-9+/=]{16,}", where):
            for start in range(4):
                chunk = token[start:]
                chunk = chunk[: len(chunk) - len(chunk) % 4]
                try:
                    assert secret.encode() not in base64.b64decode(chunk)
                except ValueError:
                    pass


@pytest.mark.usefixtures("worker")
def test_errors_are_logged_with_their_traceback_as_a_scrubbed_field_of_the_json_line(app, client, host, peers):
    import io
    import logging

    from app.logs import JsonFormatter
    from app.redact import secrets_in_scope

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bapba.test")
    logger.addHandler(handler)
    try:
        with secrets_in_scope([SECRET]):
            try:
                raise RuntimeError(f"library said {SECRET} and {_base64_at(b'u')}")
            except RuntimeError:
                logger.exception("the provider call failed")
    finally:
        logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["error_type"] == "RuntimeError" and "Traceback" in entry["traceback"]
    assert "RuntimeError: library said [redacted]" in entry["traceback"]
    assert SECRET not in line and _base64_at(b"u") not in line


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("kind", ["email", "sms", "telegram"])
def test_a_tests_destination_never_crosses_the_broker_and_is_erased_when_the_attempt_ends(
    app, client, host, peers, kind
):
    from celery.signals import before_task_publish
    from sqlalchemy import text

    from app.extensions import db
    from tests.support import db_id

    published: list[str] = []

    def capture(body=None, headers=None, **_):  # noqa: ANN001, ANN202
        published.append(json.dumps([body, headers], default=str))

    connector = create_connector(client, host, kind, peers=peers)
    destination = DESTINATIONS[kind]
    before_task_publish.connect(capture, weak=False)
    try:
        assert send_test(client, host, connector["id"], destination).status_code == 200
    finally:
        before_task_publish.disconnect(capture)
    assert published and not any(destination in message or destination.lstrip("+") in message for message in published)
    with app.app_context():
        sealed = db.session.execute(
            text("SELECT destination, destination_sealed FROM delivery_attempts WHERE connector_id = :c"),
            {"c": db_id(app, connector["id"])},
        ).all()
        db.session.remove()
    [(masked, kept)] = sealed
    assert masked != destination and kept is None
