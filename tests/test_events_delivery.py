"""Events to a slow receiver and from a backlog: each taken once and in order, over connections kept between
events; a backlog larger than a job's batch drains without waiting for the sweep."""

from __future__ import annotations

import time
import uuid

import pytest

from app import create_app
from app.config import ConfigError
from app.events.models import Event
from app.events.service import DELIVERY_BATCH
from app.extensions import db
from app.timeutil import utcnow
from tests.conftest import WEBHOOK_SECRET, _start_worker_subprocess, create_connector, service_headers
from tests.peers import WebhookReceiver
from tests.support import sibling_app, wait_for_worker

RECEIVER_SECONDS = 10.0  # how long the receiver that was found took to answer each event


def test_a_receiver_taking_10_s_gets_each_event_once_in_order_over_one_connection(app, host, tmp_path):
    receiver = WebhookReceiver(WEBHOOK_SECRET).start()
    receiver.delay = RECEIVER_SECONDS
    # The session's PROVIDER_TIMEOUT (2 s) stays as it is: the webhook waits EVENTS_TIMEOUT, not that.
    sibling = sibling_app(app, tmp_path, EVENTS_WEBHOOK_URL=f"{receiver.base_url}/bapba/events", EVENTS_TIMEOUT="12")
    assert sibling.config["PROVIDER_TIMEOUT"] < RECEIVER_SECONDS < sibling.config["EVENTS_TIMEOUT"]
    log_path = tmp_path / "events-worker.log"
    worker = _start_worker_subprocess(sibling.config["SIBLING_ENV"], log_path)
    try:
        wait_for_worker(sibling, worker, log_path)
        http = sibling.test_client()
        connector = create_connector(http, host, "email")
        renamed = http.put(f"/api/connectors/{connector['id']}", json={"priority": 2}, headers=host.headers)
        assert renamed.status_code == 200
        assert http.delete(f"/api/connectors/{connector['id']}", headers=host.headers).status_code == 204
        polled = http.get("/api/internal/events?after=0", headers=service_headers()).get_json()["events"]
        assert [event["type"] for event in polled] == ["connector.created", "connector.updated", "connector.deleted"]

        received = receiver.wait_for(len(polled), seconds=len(polled) * RECEIVER_SECONDS + 15)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        receiver.stop()
    assert [event["webhook_id"] for event in received] == [f"evt_{event['id']}" for event in polled]
    assert [event["type"] for event in received] == [event["type"] for event in polled]
    assert receiver.refused == 0
    assert receiver.connections == 1  # one connection kept from event to event
    assert "not delivered" not in log_path.read_text()  # no try failed: nothing was posted a second time


@pytest.mark.usefixtures("worker")
def test_a_backlog_larger_than_a_batch_drains_in_order_without_the_sweep(app, client, host, peers):
    backlog = DELIVERY_BATCH + 100  # written while the receiver was away
    with app.app_context():
        db.session.add_all(
            Event(type="connector.updated", host_id=uuid.uuid4(), data={"n": n}, created_at=utcnow())
            for n in range(backlog)
        )
        db.session.commit()
    opened = peers.events.connections
    created = create_connector(client, host, "email")  # its event's delivery meets the backlog first
    received = peers.events.wait_for(backlog + 1, seconds=60)
    time.sleep(0.5)  # any second post of the last ones
    received = list(peers.events.received)
    assert [event["data"].get("n") for event in received[:backlog]] == list(range(backlog))
    assert received[-1]["data"]["connector_id"] == created["id"] and len(received) == backlog + 1
    ids = [int(event["webhook_id"].removeprefix("evt_")) for event in received]
    assert ids == sorted(set(ids))  # in order, none twice
    # One job after another, each posting over its thread's kept connection, not one connection per event.
    assert peers.events.connections - opened <= 2


def test_events_timeout_defaults_to_15_s_whatever_the_provider_timeout(tmp_path):
    env = {"INSTANCE_PATH": str(tmp_path), "JWT_SECRET_KEY": "j" * 40, "MASTER_KEY": "22" * 32}
    assert create_app(env={**env, "PROVIDER_TIMEOUT": "1"}).config["EVENTS_TIMEOUT"] == 15


@pytest.mark.parametrize("value", ["soon", "0", "301"])
def test_a_malformed_events_timeout_fails_fast_naming_the_variable(tmp_path, value):
    env = {"INSTANCE_PATH": str(tmp_path), "JWT_SECRET_KEY": "j" * 40, "MASTER_KEY": "22" * 32}
    with pytest.raises(ConfigError, match="EVENTS_TIMEOUT"):
        create_app(env={**env, "EVENTS_TIMEOUT": value})
