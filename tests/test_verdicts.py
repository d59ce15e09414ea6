"""Fair verdicts: is_verified means "this connector works", and only failures that say it does not may clear it;
each channel's text limit takes it out of a message's candidates."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.conftest import Host, create_connector, service_headers
from tests.support import DESTINATIONS, send_test
from tests.test_dispatch import dispatch, wait_final

pytestmark = pytest.mark.usefixtures("worker")


def verified(client: FlaskClient, host: Host, connector_id: str) -> bool:
    listed = client.get("/api/connectors", headers=host.headers).get_json()["connectors"]
    return next(c["is_verified"] for c in listed if c["id"] == connector_id)


def unverified_events(client: FlaskClient, connector_id: str) -> list[dict[str, Any]]:
    events = client.get("/api/internal/events?after=0&limit=1000", headers=service_headers()).get_json()["events"]
    return [e for e in events if e["type"] == "connector.unverified" and e["data"]["connector_id"] == connector_id]


def a_verified(client: FlaskClient, host: Host, peers: Any, kind: str, **fields: Any) -> dict[str, Any]:
    connector = create_connector(client, host, kind, peers=peers, **fields)
    assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 200
    assert verified(client, host, connector["id"]) is True
    return connector


@pytest.mark.parametrize(("mode", "code"), [("reject", "destination_rejected"), ("error", "provider_error")])
def test_a_dispatch_to_a_refused_recipient_or_during_a_provider_failure_leaves_is_verified(
    app, client, host, peers, mode, code
):
    sms = a_verified(client, host, peers, "sms", priority=0)
    email = a_verified(client, host, peers, "email", priority=1)
    peers.twilio.mode = mode
    final = wait_final(app, client, dispatch(client, host.id).get_json()["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == email["id"]
    assert [(a["type"], a["error_code"]) for a in final["attempts"]][0] == ("sms", code)
    assert verified(client, host, sms["id"]) is True
    assert unverified_events(client, sms["id"]) == []


def test_credentials_refused_during_a_dispatch_clear_is_verified(app, client, host, peers):
    sms = a_verified(client, host, peers, "sms", priority=0)
    a_verified(client, host, peers, "email", priority=1)
    peers.twilio.mode = "auth"
    final = wait_final(app, client, dispatch(client, host.id).get_json()["id"])
    assert final["status"] == "delivered"
    assert verified(client, host, sms["id"]) is False
    [event] = unverified_events(client, sms["id"])
    assert event["data"]["error_code"] == "auth_failed"


def test_the_hosts_own_test_judges_a_provider_failure_but_never_a_refused_recipient(client, host, peers):
    sms = a_verified(client, host, peers, "sms")
    peers.twilio.mode = "reject"
    answer = send_test(client, host, sms["id"], DESTINATIONS["sms"])
    assert answer.status_code == 502 and answer.get_json()["error_code"] == "destination_rejected"
    assert verified(client, host, sms["id"]) is True
    peers.twilio.mode = "error"
    answer = send_test(client, host, sms["id"], DESTINATIONS["sms"])
    assert answer.status_code == 502 and answer.get_json()["error_code"] == "provider_error"
    assert verified(client, host, sms["id"]) is False


def test_a_text_longer_than_sms_takes_goes_by_another_channel(app, client, host, peers):
    create_connector(client, host, "sms", peers=peers, priority=0)
    email = create_connector(client, host, "email", peers=peers, priority=1)
    long_text = "x" * 1601
    final = wait_final(app, client, dispatch(client, host.id, text=long_text).get_json()["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == email["id"]
    assert [a["type"] for a in final["attempts"]] == ["email"]
    time.sleep(0.2)
    assert peers.twilio.received == []


def test_a_text_no_candidate_takes_is_422_no_route_saying_so(client, host, peers):
    create_connector(client, host, "sms", peers=peers)
    # 800 characters outside the Basic Multilingual Plane count 1,600 as Twilio counts; 801 are too many.
    fits = dispatch(client, host.id, recipient={"phone": "+14155552671"}, text="\U0001f600" * 800)
    assert fits.status_code == 202, fits.get_json()
    refused = dispatch(client, host.id, recipient={"phone": "+14155552671"}, text="\U0001f600" * 801)
    body = refused.get_json()
    assert refused.status_code == 422 and body["error_code"] == "no_route"
    assert body["message"] == (
        "No connector of this Host can reach the recipient at the addresses given (phone): this Host has no "
        "connector of type whatsapp; the text is 1,602 characters long and sms takes 1,600"
    )
