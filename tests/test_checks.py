"""Connectors that stay honest: checks without sending, re-checks that follow the provider, signed events."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.conftest import Host, Peers, config_for, create_connector, service_headers
from tests.support import DESTINATIONS, run_periodic, send_test

pytestmark = pytest.mark.usefixtures("worker")


def verify(client: FlaskClient, host: Host, connector_id: str) -> Any:
    return client.post(f"/api/connectors/{connector_id}/verify", headers=host.headers)


def is_verified(client: FlaskClient, host: Host, connector_id: str) -> bool:
    listed = client.get("/api/connectors", headers=host.headers).get_json()["connectors"]
    return next(c["is_verified"] for c in listed if c["id"] == connector_id)


def delivered_anything(peers: Peers) -> bool:
    sent = [
        item for peer in (peers.twilio, peers.whatsapp, peers.telegram) for item in peer.received if "check" not in item
    ]
    return bool(sent or peers.smtp.received or peers.smtp.rcpt_count)


@pytest.mark.parametrize(
    ("kind", "details"),
    [
        ("email", {"server": "mx.peer.example"}),
        ("sms", {"from_number": "+14155550100", "account": "BAPBA test account"}),
        ("whatsapp", {"display_phone_number": "+1 415-555-0100", "verified_name": "BAPBA Test"}),
        ("telegram", {"username": "@test_bot"}),
    ],
)
def test_a_check_proves_credentials_and_sender_without_delivering_anything(client, host, peers, kind, details):
    connector = create_connector(client, host, kind, peers=peers)
    response = verify(client, host, connector["id"])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["success"] is True and body["details"] == details
    assert isinstance(body["check_time_ms"], int) and body["check_time_ms"] >= 0
    assert not delivered_anything(peers)
    assert is_verified(client, host, connector["id"]) is True
    deliveries = client.get(f"/api/connectors/{connector['id']}/deliveries", headers=host.headers).get_json()
    [entry] = deliveries["deliveries"]
    # A check sends nothing, and its entry does not say it did.
    assert (entry["kind"], entry["status"], entry["destination"]) == ("check", "verified", None)
    assert entry["message"] == "Credentials and sender verified; nothing was sent"


@pytest.mark.parametrize("kind", ["email", "sms", "whatsapp", "telegram"])
def test_refused_credentials_are_502_auth_failed_and_unverify(client, host, peers, kind):
    connector = create_connector(client, host, kind, peers=peers)
    assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 200
    {"email": peers.smtp, "sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram}[
        kind
    ].mode = "auth"
    response = verify(client, host, connector["id"])
    body = response.get_json()
    assert response.status_code == 502 and body["error_code"] == "auth_failed" and body["success"] is False
    assert is_verified(client, host, connector["id"]) is False


def test_a_sender_the_provider_does_not_accept_is_sender_rejected(client, host, peers):
    email = create_connector(client, host, "email", peers=peers)
    sms = create_connector(client, host, "sms", peers=peers)
    whatsapp = create_connector(client, host, "whatsapp", peers=peers)
    peers.smtp.mode = "reject_sender"
    peers.twilio.owned_numbers = ("+14155550111",)  # from_number is not one of the account's
    peers.whatsapp.listed_numbers = ("999",)  # the number is not the business account's
    for connector in (email, sms, whatsapp):
        response = verify(client, host, connector["id"])
        assert response.status_code == 502, response.get_json()
        assert response.get_json()["error_code"] == "sender_rejected", response.get_json()
    assert not delivered_anything(peers)


def test_checks_have_their_own_limit_of_ten_an_hour(client, host, peers):
    connector = create_connector(client, host, "telegram", peers=peers)
    assert [verify(client, host, connector["id"]).status_code for _ in range(10)] == [200] * 10
    limited = verify(client, host, connector["id"])
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert send_test(client, host, connector["id"], DESTINATIONS["telegram"]).status_code == 200


def test_re_checks_follow_the_provider_without_anyone_asking(app, client, host, peers):
    """CONNECTOR_CHECK_INTERVAL is 2 s here; beat's `checks.schedule` is run as beat would."""
    connector = create_connector(client, host, "email", peers=peers)
    assert send_test(client, host, connector["id"], DESTINATIONS["email"]).status_code == 200
    peers.smtp.received.clear()
    peers.smtp.rcpt_count = 0

    def settle(expected: bool) -> None:
        deadline = time.monotonic() + 20
        while is_verified(client, host, connector["id"]) is not expected:
            assert time.monotonic() < deadline, f"is_verified never became {expected}"
            run_periodic(app, "checks.schedule")
            time.sleep(0.3)

    peers.smtp.credentials["password"] = "changed-at-the-provider"  # next spring
    settle(False)
    peers.smtp.credentials["password"] = config_for("email")["password"]  # the Host fixed it
    settle(True)
    assert not delivered_anything(peers)  # re-checks never send
    listed = client.get(f"/api/connectors/{connector['id']}/deliveries?limit=100", headers=host.headers).get_json()
    kinds = [d["kind"] for d in listed["deliveries"]]
    assert kinds.count("check") >= 2 and kinds[-1] == "test"


def test_a_check_that_fails_for_a_reason_of_ours_changes_nothing(app, client, host, peers, tmp_path):
    from tests.support import sibling_app

    connector = create_connector(client, host, "telegram", peers=peers)
    assert send_test(client, host, connector["id"], DESTINATIONS["telegram"]).status_code == 200
    lonely = sibling_app(app, tmp_path, TEST_DELIVERY_TIMEOUT="1.5", PROVIDER_TIMEOUT="0.5")  # no worker listens
    response = lonely.test_client().post(f"/api/connectors/{connector['id']}/verify", headers=host.headers)
    assert response.status_code == 502 and response.get_json()["error_code"] == "timeout"
    assert is_verified(client, host, connector["id"]) is True


def test_events_arrive_signed_in_order_after_the_receiver_was_down(app, client, host, peers):
    peers.events.mode = "down"
    connector = create_connector(client, host, "telegram", peers=peers)
    assert send_test(client, host, connector["id"], DESTINATIONS["telegram"]).status_code == 200  # verified
    peers.telegram.mode = "auth"
    assert verify(client, host, connector["id"]).status_code == 502  # unverified
    client.put(f"/api/connectors/{connector['id']}", json={"priority": 3}, headers=host.headers)
    client.delete(f"/api/connectors/{connector['id']}", headers=host.headers)
    expected = ["connector.created", "connector.verified", "connector.unverified", "connector.updated",
                "connector.deleted"]  # fmt: skip
    polled = client.get("/api/internal/events?after=0&limit=100", headers=service_headers()).get_json()["events"]
    assert [e["type"] for e in polled] == expected
    assert [e["id"] for e in polled] == sorted(e["id"] for e in polled)
    assert polled[2]["data"]["error_code"] == "auth_failed" and polled[2]["data"]["connector_id"] == connector["id"]
    time.sleep(1)
    assert peers.events.received == []  # down: nothing taken yet, retries wait
    peers.events.mode = "ok"
    deadline = time.monotonic() + 20
    while len(peers.events.received) < len(expected):
        assert time.monotonic() < deadline, peers.events.received
        run_periodic(app, "dispatch.sweep")  # beat's sweep nudges the sender when events are due
        time.sleep(0.3)
    time.sleep(0.5)
    received = peers.events.received
    assert [e["type"] for e in received] == expected and peers.events.refused == 0
    assert [e["webhook_id"] for e in received] == [f"evt_{e['id']}" for e in polled]
    assert received[0]["data"] == polled[0]["data"] and received[0]["timestamp"].endswith("Z")
    after = client.get(f"/api/internal/events?after={polled[1]['id']}", headers=service_headers()).get_json()
    assert [e["type"] for e in after["events"]] == expected[2:]
    assert client.get("/api/internal/events", headers=host.headers).status_code == 403
