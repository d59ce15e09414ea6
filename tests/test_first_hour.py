"""A newcomer's first hour: settings that fail in one line, answers that say what is wrong, a mail sink."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, config_for, create_connector, new_host, service_headers
from tests.peers import free_port
from tests.support import send_test

BIN = Path(sys.executable).parent


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    keep = {key: value for key, value in os.environ.items() if key in {"PATH", "HOME", "LANG", "SYSTEMROOT"}}
    return {**keep, "INSTANCE_PATH": str(tmp_path / "instance"), "APP_ENV": "development", **values}


COMMANDS = {
    "release": [str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
    "web": [str(BIN / "gunicorn"), "wsgi:app"],
    "worker": [str(BIN / "celery"), "-A", "celery_app", "worker", "--pool", "threads", "--concurrency", "1"],
    "beat": [str(BIN / "celery"), "-A", "celery_app", "beat"],
}
SECRETS = {"JWT_SECRET_KEY": "k" * 40, "MASTER_KEY": "22" * 32}
NOBODY_LISTENS = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
BAD_SETTINGS = {
    "garbage database url": ({"DATABASE_URL": "garbage", **SECRETS}, "DATABASE_URL"),
    "unreachable database": ({"DATABASE_URL": NOBODY_LISTENS, **SECRETS}, "DATABASE_URL"),
    "not a number": ({"TEST_DELIVERY_TIMEOUT": "abc"}, "TEST_DELIVERY_TIMEOUT"),
    "short master key": ({"MASTER_KEY": "abc", "JWT_SECRET_KEY": "k" * 40}, "MASTER_KEY"),
}  # fmt: skip


@pytest.mark.parametrize("process", list(COMMANDS))
@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_a_bad_setting_is_one_line_naming_the_variable_and_a_non_zero_exit(tmp_path, process, case):
    values, variable = BAD_SETTINGS[case]
    env = {**_env(tmp_path, PORT=str(free_port())), **values}
    finished = subprocess.run(COMMANDS[process], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0, finished.stdout + finished.stderr
    assert "Traceback" not in finished.stderr + finished.stdout
    ours = [line for line in finished.stderr.splitlines() if line.startswith("connectors: ")]
    assert len(ours) == 1 and variable in ours[0], finished.stderr


def test_a_validation_error_says_validation_failed_with_the_fields(client, host):
    response = client.post("/api/connectors", json={"type": "email", "name": ""}, headers=host.headers)
    body = response.get_json()
    assert response.status_code == 400 and body["message"] == "Validation failed: see errors"
    assert set(body["errors"]["json"]) == {"name", "config"}


def test_empty_credentials_say_they_are_required(client, host):
    config = {"provider": "twilio", "api_key_sid": "SK" + "a" * 32, "api_key_secret": "", "from_number": "+14155550100"}
    response = client.post("/api/connectors", json={"type": "sms", "name": "s", "config": config}, headers=host.headers)
    assert response.status_code == 400
    assert response.get_json()["errors"]["json"]["config"]["api_key_secret"] == [
        "Required: must be 1 to 256 characters."
    ]


def test_a_429_says_what_was_limited_and_when_to_retry(client, host):
    for index in range(10):
        create_connector(client, host, "telegram", f"t{index}")
    response = client.post(
        "/api/connectors", json={"type": "telegram", "name": "one too many", "config": {}}, headers=host.headers
    )
    body = response.get_json()
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
    assert "10 per 1 hour" in body["message"] and "Retry-After" in body["message"]


@pytest.mark.usefixtures("worker")
def test_the_development_mail_sink_takes_a_test_email_as_the_readme_says(app, client, tmp_path):
    port = free_port()
    env = {**os.environ, "INSTANCE_PATH": str(tmp_path / "sink")}
    env.pop("DATABASE_URL", None)
    sink = subprocess.Popen(
        [str(BIN / "flask"), "--app", "wsgi", "mail-sink", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:  # until the sink listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and sink.poll() is None, "the mail sink did not start"
                time.sleep(0.1)
        host = new_host()
        # The connector the README gives, on the sink's port.
        config = {
            "smtp_host": "127.0.0.1", "smtp_port": port, "username": "dev", "password": "anything-at-all",
            "from_address": "dev@example.com", "security": "none",
        }  # fmt: skip
        connector = client.post(
            "/api/connectors", json={"type": "email", "name": "Mail sink", "config": config}, headers=host.headers
        ).get_json()
        response = client.post(
            f"/api/connectors/{connector['id']}/test", json={"test_destination": "me@example.com"}, headers=host.headers
        )
        assert response.status_code == 200, response.get_json()
    finally:
        sink.terminate()
        output, _ = sink.communicate(timeout=10)
    assert "--- mail from dev@example.com to me@example.com" in output
    assert "Subject: BAPBA connector test" in output


def test_no_route_says_which_connector_types_the_host_lacks(client, host):
    headers = {**service_headers(), "Idempotency-Key": "no-route"}
    will = client.put(f"/api/internal/hosts/{host.id}/will", json={"active": False}, headers=service_headers())
    assert will.status_code == 200
    body = {"purpose": "otp", "recipient": {"email": "ana@example.org"}, "text": "Your code is 1"}
    refused = client.post(f"/api/internal/hosts/{host.id}/messages", json=body, headers=headers).get_json()
    assert refused["error_code"] == "no_route"
    assert refused["message"] == (
        "No connector of this Host can reach the recipient at the addresses given (email): "
        "this Host has no connector of type email"
    )
    create_connector(client, host, "email")
    sms_only = {**body, "channels": ["sms"]}
    refused = client.post(f"/api/internal/hosts/{host.id}/messages", json=sms_only, headers=headers).get_json()
    assert refused["message"].endswith("(email): no connector type within channels can reach them")


@pytest.mark.usefixtures("worker")
def test_a_short_password_withholds_the_providers_words_and_keeps_the_services_own(client, host, peers):
    # The mail peer offers no STARTTLS: the service's own diagnosis is kept however short the password.
    starttls = config_for("email", peers, password="p", security="starttls")
    connector = create_connector(client, host, "email", "starttls", config=starttls)
    answer = send_test(client, host, connector["id"]).get_json()
    assert (answer["error_code"], answer["message"]) == (
        "provider_unreachable",
        "SMTP server does not offer STARTTLS; set security to ssl or none",
    )
    # The peer refuses the login: its reply could quote the 1-character password, so it is withheld.
    plain = create_connector(client, host, "email", "plain", config=config_for("email", peers, password="p"))
    answer = send_test(client, host, plain["id"]).get_json()
    assert (answer["error_code"], answer["message"]) == (
        "auth_failed",
        "SMTP server rejected the login (the provider's answer is withheld)",
    )


def test_deleting_the_last_connector_while_the_will_is_active_is_409_last_connector(client, host):
    connector = create_connector(client, host, "email")
    will = client.put(f"/api/internal/hosts/{host.id}/will", json={"active": True}, headers=service_headers())
    assert will.status_code == 200
    refused = client.delete(f"/api/connectors/{connector['id']}", headers=host.headers)
    assert refused.status_code == 409 and refused.get_json()["error_code"] == "last_connector"
