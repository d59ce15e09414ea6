"""The operators' commands: `connectors`, `messages`, `message` and `events`, read-only, through the CLI runner.

They show what the API shows (the same JSON with `--json`), never a secret, never a message's words or a full
address; an unknown id is one line and a non-zero exit.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import SECRET_VALUES, Host, Peers, config_for, create_connector, service_headers
from tests.support import DESTINATIONS, run_periodic, send_test

pytestmark = pytest.mark.usefixtures("worker")

OTP_TEXT = "Your code is 482913. It expires in 10 minutes."
CHAT_ID = DESTINATIONS["telegram"]
WRONG_PASSWORD = "operator-wrong-smtp-pw-71c3"


@dataclass
class Scene:
    host: Host
    telegram: dict[str, Any]
    email: dict[str, Any]
    message: dict[str, Any]


def cli(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def api(client: FlaskClient, path: str, host: Host | None = None) -> Any:
    response = client.get(path, headers=host.headers if host else service_headers())
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def wait_final(app: Flask, client: FlaskClient, message_id: str, seconds: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:
        current = api(client, f"/api/internal/messages/{message_id}")
        if current["status"] in {"delivered", "failed", "expired", "unknown", "unconfirmed"}:
            return current
        assert time.monotonic() < deadline, current
        run_periodic(app, "dispatch.sweep")  # what beat does every SWEEP_INTERVAL
        time.sleep(0.2)


@pytest.fixture
def scene(app: Flask, client: FlaskClient, host: Host, peers: Peers) -> Scene:
    """A Host with a verified Telegram connector, an email connector whose last test failed, and a message
    delivered through Telegram."""
    telegram = create_connector(client, host, "telegram", "bot", peers=peers)
    assert send_test(client, host, telegram["id"], CHAT_ID).status_code == 200
    config = config_for("email", peers, password=WRONG_PASSWORD)
    body = {"type": "email", "name": "mailbox", "config": config, "priority": 1}
    email = client.post("/api/connectors", json=body, headers=host.headers).get_json()
    failed = send_test(client, host, email["id"])
    assert failed.status_code == 502 and failed.get_json()["error_code"] == "auth_failed"

    headers = {**service_headers(), "Idempotency-Key": uuid.uuid4().hex}
    body = {"purpose": "otp", "recipient": {"telegram_chat_id": CHAT_ID}, "text": OTP_TEXT}
    created = client.post(f"/api/internal/hosts/{host.id}/messages", json=body, headers=headers)
    assert created.status_code == 202, created.get_json()
    message = wait_final(app, client, created.get_json()["id"])
    assert message["status"] == "delivered"
    return Scene(host, telegram, email, message)


def assert_nothing_private(output: str) -> None:
    leaked = [value for value in (*SECRET_VALUES, WRONG_PASSWORD, OTP_TEXT, "482913", CHAT_ID) if value in output]
    assert leaked == [], f"the command printed {leaked}"
    assert "Traceback" not in output


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines()[1:]]


# --- connectors ---------------------------------------------------------------------------------------------


def test_connectors_shows_each_connector_its_verification_and_its_last_attempt(app, scene):
    result = cli(app, "connectors", str(scene.host.id))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == [
        "ID", "TYPE", "NAME", "PRIORITY", "VERIFIED", "LAST", "ATTEMPT", "KIND", "STATUS", "ERROR"
    ]  # fmt: skip
    telegram, email = rows(result.output)  # the API's order: priority first
    assert telegram[:5] == [scene.telegram["id"], "telegram", "bot", "0", "yes"]
    assert telegram[6:] == ["message", "sent", "-"]  # the dispatch came after the test
    assert email[:5] == [scene.email["id"], "email", "mailbox", "1", "no"]
    assert email[6:] == ["test", "failed", "auth_failed"]
    assert_nothing_private(result.output)


def test_connectors_json_is_the_apis_list_with_each_last_attempt(app, client, scene):
    result = cli(app, "connectors", str(scene.host.id), "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    listed = api(client, "/api/connectors", scene.host)["connectors"]
    assert [{k: v for k, v in c.items() if k != "last_attempt"} for c in shown["connectors"]] == listed
    for connector in shown["connectors"]:
        deliveries = api(client, f"/api/connectors/{connector['id']}/deliveries?limit=1", scene.host)["deliveries"]
        assert connector["last_attempt"] == deliveries[0]
    assert_nothing_private(result.output)


def test_a_host_without_connectors_says_so(app, client, host):
    connector = create_connector(client, host, "telegram")
    assert client.delete(f"/api/connectors/{connector['id']}", headers=host.headers).status_code == 204
    result = cli(app, "connectors", str(host.id))
    assert result.exit_code == 0 and result.output.strip() == f"Host {host.id} has no connectors"


# --- messages and message -----------------------------------------------------------------------------------


def test_messages_lists_a_hosts_messages_or_everyones_by_status(app, scene):
    own = cli(app, "messages", "--host", str(scene.host.id))
    assert own.exit_code == 0, own.output
    assert [row[:4] for row in rows(own.output)] == [[scene.message["id"], str(scene.host.id), "otp", "delivered"]]
    assert rows(own.output)[0][-2:] == ["telegram", "1"]  # delivered via, attempts

    delivered = cli(app, "messages", "--status", "delivered")
    assert [row[0] for row in rows(delivered.output)] == [scene.message["id"]]
    assert cli(app, "messages", "--status", "failed").output.strip() == "no messages"
    for result in (own, delivered):
        assert_nothing_private(result.output)


def test_messages_json_is_what_the_api_lists(app, client, scene):
    result = cli(app, "messages", "--host", str(scene.host.id), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == api(client, f"/api/internal/hosts/{scene.host.id}/messages")


def test_message_shows_its_attempts_masked_as_the_api_masks_them_never_its_words(app, client, scene):
    result = cli(app, "message", scene.message["id"])
    assert result.exit_code == 0, result.output
    attempt = scene.message["attempts"][0]
    assert attempt["destination"] and attempt["destination"] != CHAT_ID
    fields = {line.split()[0]: line.split()[1:] for line in result.output.split("\n\n")[0].splitlines()}
    assert fields["id:"] == [scene.message["id"]] and fields["status:"] == ["delivered"]
    assert fields["via:"] == ["telegram", scene.telegram["id"]]
    attempts = result.output.split("\n\n")[1].splitlines()
    assert attempts[0].split() == [
        "STARTED", "FINISHED", "TYPE", "CONNECTOR", "DESTINATION", "STATUS", "ERROR", "MS", "MESSAGE"
    ]  # fmt: skip
    assert len(attempts) == 2
    assert attempts[1].split()[2:7] == ["telegram", scene.telegram["id"], attempt["destination"], "sent", "-"]
    assert_nothing_private(result.output)

    as_json = cli(app, "message", scene.message["id"], "--json")
    assert json.loads(as_json.output) == api(client, f"/api/internal/messages/{scene.message['id']}")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("message", "{id}"), "Error: Message {id} not found"),
        (("messages", "--host", "{id}"), "Error: Host {id} not found"),
        (("connectors", "{id}"), "Error: Host {id} not found"),
    ],
)
def test_an_unknown_id_is_one_line_and_exit_status_1(app, client, args, error):
    unknown = str(uuid.uuid4())
    result = cli(app, *(arg.format(id=unknown) for arg in args))
    assert (result.exit_code, result.output.strip()) == (1, error.format(id=unknown))
    # Read-only: asking about a Host does not create it (the API still does not know it).
    assert client.get(f"/api/internal/hosts/{unknown}/messages", headers=service_headers()).status_code == 404


def test_an_id_that_is_not_a_uuid_is_a_usage_error(app):
    result = cli(app, "message", "not-a-uuid")
    assert result.exit_code == 2 and "'not-a-uuid' is not a valid UUID" in result.output
    assert "Traceback" not in result.output


# --- events -------------------------------------------------------------------------------------------------


def test_events_after_an_id_are_the_apis_in_order(app, client, scene):
    every = api(client, "/api/internal/events?after=0")["events"]
    assert len(every) >= 4, every  # two created, one updated, one verified, one delivered
    after = every[1]["id"]
    result = cli(app, "events", "--after", str(after))
    assert result.exit_code == 0, result.output
    listed = rows(result.output)
    assert [int(row[0]) for row in listed] == [event["id"] for event in every[2:]]
    assert [row[2] for row in listed] == [event["type"] for event in every[2:]]
    delivered = next(row for row in listed if row[2] == "message.delivered")
    assert f"message_id={scene.message['id']}" in delivered and "status=delivered" in delivered
    assert_nothing_private(result.output)

    as_json = cli(app, "events", "--after", str(after), "--json")
    assert json.loads(as_json.output) == api(client, f"/api/internal/events?after={after}")


def test_no_events_after_the_last_says_so(app, client, scene):
    last = api(client, "/api/internal/events?after=0")["events"][-1]["id"]
    result = cli(app, "events", "--after", str(last))
    assert (result.exit_code, result.output.strip()) == (0, "no events")
