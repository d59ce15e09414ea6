"""One road: the web sends jobs by name and never loads the worker; the events' delivery copes with a backlog and a
burst; provider clients keep their connections between sends."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta

import pytest
from celery.signals import before_task_publish

from app.channels.base import ProviderSettings
from app.channels.sms import TwilioSmsProvider
from app.channels.whatsapp import WhatsAppProvider
from app.deliveries.jobs import TEST_MESSAGE
from app.events.models import Event
from app.extensions import db
from app.queues import COALESCE_SECONDS, DELIVER_EVENTS
from app.timeutil import utcnow
from tests.conftest import ROOT, config_for, create_connector
from tests.support import DESTINATIONS

WEB_SCRIPT = """
import sys, uuid
from flask_jwt_extended import create_access_token
import wsgi

host = str(uuid.uuid4())
with wsgi.app.app_context():
    headers = {"Authorization": "Bearer " + create_access_token(host)}
    service = {"Authorization": "Bearer " + create_access_token("will", additional_claims={"role": "service"})}
client = wsgi.app.test_client()
config = {"provider": "telegram", "bot_token": "7012345678:AAHtgSecretToken4b2d9e8f1a3c5d7e"}
created = client.post("/api/connectors", json={"type": "telegram", "name": "t", "config": config}, headers=headers)
assert created.status_code == 201, created.get_json()
tested = client.post(f"/api/connectors/{created.get_json()['id']}/test", json={"test_destination": "123456789"},
                     headers=headers)
service["Idempotency-Key"] = "k1"
body = {"purpose": "otp", "recipient": {"telegram_chat_id": "123456789"}, "text": "Your code is 1"}
sent = client.post(f"/api/internal/hosts/{host}/messages", json=body, headers=service)
loaded = sorted(name for name in sys.modules if name == "worker" or name.startswith("worker."))
celery = wsgi.app.extensions["celery"]
print(tested.status_code, tested.get_json()["error_code"], sent.status_code, loaded, list(celery.conf.include))
"""


def test_the_web_sends_jobs_by_name_and_never_loads_the_worker(tmp_path):
    env = {
        key: value for key, value in os.environ.items() if key in {"PATH", "HOME", "LANG", "SSL_CERT_FILE"}
    } | {
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "JWT_SECRET_KEY": "test-jwt-secret-" + "j" * 48,
        "MASTER_KEY": "11" * 32,
        "TEST_DELIVERY_TIMEOUT": "1",
        "PROVIDER_TIMEOUT": "0.5",
    }
    flask = [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"]
    subprocess.run(flask, cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)
    finished = subprocess.run(
        [sys.executable, "-c", WEB_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    # No worker runs here: the test is queued by name and times out; the message is queued by name too.
    assert finished.stdout.split("\n")[-2] == "502 timeout 202 [] []", finished.stdout[-2000:]


@pytest.mark.usefixtures("worker")
def test_a_backlog_of_day_old_events_is_set_aside_at_once_and_the_new_ones_still_go_out(app, client, host, peers):
    old = utcnow() - timedelta(days=2)
    with app.app_context():
        db.session.add_all(
            Event(type="connector.updated", host_id=uuid.uuid4(), data={"n": n}, created_at=old) for n in range(1500)
        )
        db.session.commit()
    created = create_connector(client, host, "email")  # an event of now: its delivery meets the backlog first
    received = peers.events.wait_for(1, seconds=15)
    assert [(event["type"], event["data"]["connector_id"]) for event in received] == [
        ("connector.created", created["id"])
    ]
    with app.app_context():
        kept = db.session.query(Event).filter(Event.abandoned_at.is_not(None)).count()
        db.session.rollback()
    assert kept == 1500  # still there to poll, never posted


@pytest.mark.usefixtures("worker")
def test_a_burst_of_changes_queues_a_few_event_deliveries_and_every_event_arrives(client, host, peers):
    connector = create_connector(client, host, "email")
    peers.events.wait_for(1, seconds=10)
    published: list[str] = []

    def count(headers=None, **_):  # noqa: ANN001, ANN202
        if headers and headers.get("task") == DELIVER_EVENTS:
            published.append(headers["id"])

    renames = 40
    before_task_publish.connect(count, weak=False)
    try:
        started = time.monotonic()
        for index in range(renames):
            response = client.put(
                f"/api/connectors/{connector['id']}", json={"name": f"renamed {index}"}, headers=host.headers
            )
            assert response.status_code == 200
        elapsed = time.monotonic() - started
        received = peers.events.wait_for(1 + renames, seconds=20)
    finally:
        before_task_publish.disconnect(count)
    assert [event["data"]["connector_id"] for event in received[1:]] == [connector["id"]] * renames
    # At most one delivery job at the start of each window and one at its end, not one per commit.
    assert len(published) <= 2 * (elapsed / COALESCE_SECONDS + 1) and len(published) < renames, (
        len(published),
        elapsed,
    )


def _twice_from_one_thread(send) -> None:  # noqa: ANN001
    errors: list[BaseException] = []

    def run() -> None:
        try:
            send()
            send()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert errors == []


@pytest.mark.parametrize("kind", ["sms", "whatsapp"])
def test_a_thread_keeps_one_connection_to_the_provider_for_its_sends(app, peers, kind):  # app: peers reset after
    peer = getattr(peers, "twilio" if kind == "sms" else "whatsapp")
    settings = ProviderSettings(timeout=2, twilio_base_url=peers.twilio.base_url, whatsapp_base_url=peer.base_url)
    provider = (TwilioSmsProvider if kind == "sms" else WhatsAppProvider)(settings)
    config = config_for(kind)
    if kind == "whatsapp":
        config["api_version"] = "v24.0"
    opened = peer.connections
    _twice_from_one_thread(lambda: provider.send(config, DESTINATIONS[kind], TEST_MESSAGE))
    assert len(peer.wait_for(2)) == 2
    assert peer.connections - opened == 1
