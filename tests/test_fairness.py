"""Fair under floods: a Host's dispatch limit, one-time codes on their own queue, a Host's notifications in flight
capped and taken in turn, rounds that go on without beat, and an honest end for a message that may have gone."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from celery.signals import before_task_publish

from tests.conftest import create_connector, new_host, service_headers
from tests.test_dispatch import dispatch, message, wait_final

pytestmark = pytest.mark.usefixtures("worker")


def statuses(client: Any, host_id: Any) -> list[str]:
    listed = client.get(f"/api/internal/hosts/{host_id}/messages?limit=100", headers=service_headers()).get_json()
    return [m["status"] for m in listed["messages"]]


def test_each_host_has_its_own_dispatch_limit_with_retry_after(app, client, host, other_host):
    create_connector(client, host, "telegram")
    create_connector(client, other_host, "telegram")
    app.config["DISPATCH_LIMIT"] = "3 per minute"
    try:
        answers = [dispatch(client, host.id, purpose="notification") for _ in range(4)]
        other = dispatch(client, other_host.id, purpose="notification")
    finally:
        app.config["DISPATCH_LIMIT"] = "600 per minute"
    assert [a.status_code for a in answers] == [202, 202, 202, 429]
    assert int(answers[-1].headers["Retry-After"]) > 0 and "3 per 1 minute" in answers[-1].get_json()["message"]
    assert other.status_code == 202  # another Host's limit is its own


def test_a_replay_costs_nothing_of_the_dispatch_limit(app, client, host):
    create_connector(client, host, "telegram")
    app.config["DISPATCH_LIMIT"] = "2 per minute"
    try:
        first = [dispatch(client, host.id, key="same", purpose="notification").status_code for _ in range(4)]
        second = dispatch(client, host.id, key="other", purpose="notification").status_code
        third = dispatch(client, host.id, key="third", purpose="notification").status_code
    finally:
        app.config["DISPATCH_LIMIT"] = "600 per minute"
    assert (first, second, third) == ([202, 200, 200, 200], 202, 429)


def test_one_time_codes_jobs_run_on_their_own_queue(app, client, host, peers):
    create_connector(client, host, "telegram", peers=peers)
    routed: list[tuple[str, str]] = []

    def capture(headers=None, routing_key=None, **_):  # noqa: ANN001, ANN202
        routed.append((headers["task"], routing_key))

    before_task_publish.connect(capture, weak=False)
    try:
        otp = dispatch(client, host.id, purpose="otp").get_json()
        wait_final(app, client, otp["id"])
        note = dispatch(client, host.id, purpose="notification").get_json()
        wait_final(app, client, note["id"])
    finally:
        before_task_publish.disconnect(capture)
    published_here = {task for task, _queue in routed}
    assert ("dispatch.advance", "otp") in routed and ("dispatch.advance", "dispatch") in routed
    if "dispatch.send" in published_here:  # the embedded worker publishes in this process too
        assert ("dispatch.send", "otp") in routed and ("dispatch.send", "telegram") in routed


def test_a_hosts_notifications_in_flight_are_capped_and_the_rest_taken_in_turn(app, client, peers):
    """No sweep runs here: the Host's waiting notifications are taken up as its sends end."""
    flooding, other = new_host(), new_host()
    create_connector(client, flooding, "telegram", peers=peers)
    create_connector(client, other, "telegram", peers=peers)
    peers.telegram.delay = 0.6
    cap = 10  # DISPATCH_HOST_CONCURRENCY's default, which every worker of the run has
    created = [dispatch(client, flooding.id, purpose="notification").get_json()["id"] for _ in range(cap + 6)]
    most_sending, deadline = 0, time.monotonic() + 60
    while True:
        seen = statuses(client, flooding.id)
        most_sending = max(most_sending, seen.count("sending"))
        if seen.count("delivered") == len(created):
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    assert 1 < most_sending <= cap
    otp = dispatch(client, other.id, purpose="otp").get_json()
    assert wait_final(app, client, otp["id"])["status"] == "delivered"
    assert len(peers.telegram.received) == len(created) + 1


def test_a_round_after_a_backoff_starts_without_beat(app, client, host, peers):
    create_connector(client, host, "telegram", peers=peers)
    peers.telegram.mode = "error"
    created = dispatch(client, host.id, purpose="notification").get_json()
    deadline = time.monotonic() + 10
    while message(client, created["id"])["status"] != "retrying":
        assert time.monotonic() < deadline, message(client, created["id"])
        time.sleep(0.05)
    peers.telegram.mode = "ok"
    deadline = time.monotonic() + 15  # DISPATCH_RETRY_BASE is 0.3 s here; no sweep is run
    while (current := message(client, created["id"]))["status"] != "delivered":
        assert time.monotonic() < deadline, current
        time.sleep(0.1)
    assert [a["error_code"] for a in current["attempts"]] == ["provider_error", None]


def test_a_message_that_may_have_gone_ends_unknown_not_failed(app, client, host, peers):
    create_connector(client, host, "telegram", peers=peers)
    peers.telegram.mode = "garbled"  # a success whose answer cannot be read
    final = wait_final(app, client, dispatch(client, host.id, purpose="notification").get_json()["id"])
    assert final["status"] == "unknown" and final["delivered_via"] is None
    assert [(a["status"], a["error_code"]) for a in final["attempts"]] == [("unknown", "unknown")]
    events = client.get("/api/internal/events?after=0&limit=100", headers=service_headers()).get_json()["events"]
    [ended] = [e for e in events if e["type"].startswith("message.") and e["data"]["message_id"] == final["id"]]
    assert ended["type"] == "message.unknown" and ended["data"]["status"] == "unknown"


def test_an_unknown_host_is_still_404_under_the_limit(client):
    assert dispatch(client, uuid.uuid4()).status_code == 404
