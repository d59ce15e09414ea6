"""Retention: the sweep forgets messages MESSAGE_RETENTION after they ended (with their attempts), and tests and
checks after ATTEMPT_RETENTION but for each connector's latest 20, in batches.

Messages and attempts are made through the API and the worker where that is possible; what a test cannot wait
90 days or send 30 checks for (10 an hour) is backdated or added in the database, as time would have left it.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import insert, text

from app import create_app
from app.attempts import CHECK, TEST, VERIFIED, DeliveryAttempt
from app.config import ConfigError
from app.connectors.models import Connector
from app.extensions import db
from app.messages.models import DELIVERED, Message
from app.sweep import KEEP_PROBES, PRUNE_BATCH, PRUNE_BATCHES, PRUNE_CONNECTORS
from tests.conftest import Host, create_connector, service_headers
from tests.support import DESTINATIONS, db_id, run_periodic, send_test, sibling_app

pytestmark = pytest.mark.usefixtures("worker")

DAY = timedelta(days=1)
RECIPIENT = {"telegram_chat_id": DESTINATIONS["telegram"]}


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def sweep(app: Flask) -> dict[str, int]:
    """What Celery beat runs every SWEEP_INTERVAL, through the worker."""
    return run_periodic(app, "dispatch.sweep")


def delivered_message(app: Flask, client: FlaskClient, host: Host) -> dict[str, Any]:
    headers = {**service_headers(), "Idempotency-Key": uuid.uuid4().hex}
    body = {"purpose": "notification", "recipient": RECIPIENT, "text": "Your stay begins tomorrow"}
    created = client.post(f"/api/internal/hosts/{host.id}/messages", json=body, headers=headers)
    assert created.status_code == 202, created.get_json()
    deadline = time.monotonic() + 20
    while (shown := get_message(client, created.get_json()["id"])).get_json()["status"] != DELIVERED:
        assert time.monotonic() < deadline, shown.get_json()
        sweep(app)
        time.sleep(0.1)
    return shown.get_json()


def get_message(client: FlaskClient, message_id: str) -> Any:
    return client.get(f"/api/internal/messages/{message_id}", headers=service_headers())


def listed_messages(client: FlaskClient, host: Host) -> list[str]:
    answer = client.get(f"/api/internal/hosts/{host.id}/messages?limit=100", headers=service_headers())
    return [shown["id"] for shown in answer.get_json()["messages"]]


def deliveries(client: FlaskClient, host: Host, connector_id: str) -> list[dict[str, Any]]:
    answer = client.get(f"/api/connectors/{connector_id}/deliveries?limit=100", headers=host.headers)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()["deliveries"]


def backdate(app: Flask, statement: str, **params: Any) -> None:
    with app.app_context():
        assert db.session.execute(text(statement), params).rowcount >= 1
        db.session.commit()


def add_probes(app: Flask, connector_id: str, ages: list[timedelta], kind: str = CHECK) -> list[str]:
    """Finished checks (or tests) of the connector, as the daily re-check leaves them; their ids, in `ages`' order."""
    ids = [uuid.uuid4() for _ in ages]
    taken = now()
    rows = [
        {
            "id": attempt_id,
            "connector_id": uuid.UUID(connector_id),
            "connector_type": "telegram",
            "kind": kind,
            "status": VERIFIED,
            "created_at": taken - age,
            "finished_at": taken - age + timedelta(seconds=1),
        }
        for attempt_id, age in zip(ids, ages, strict=True)
    ]
    with app.app_context():
        db.session.execute(insert(DeliveryAttempt), rows)
        db.session.commit()
    return [str(attempt_id) for attempt_id in ids]


def add_ended_messages(app: Flask, host: Host, count: int, rounds: int = 1) -> list[dict[str, Any]]:
    """Messages that ended 100 days ago, one a second, the latest first; as the database holds them."""
    ended = now() - 100 * DAY
    rows = [
        {
            "id": uuid.uuid4(),
            "host_id": host.id,
            "idempotency_key": f"old-{index}",
            "request_digest": "0" * 64,
            "purpose": "notification",
            "status": DELIVERED,
            "routes": ["telegram"],
            "recipient_masked": {"telegram_chat_id": "12***89"},
            "round": rounds,
            "expires_at": ended,
            "created_at": ended - timedelta(minutes=1),
            "updated_at": ended,
            "finished_at": ended - timedelta(seconds=index),
        }
        for index in range(count)
    ]
    with app.app_context():
        db.session.execute(insert(Message), rows)
        db.session.commit()
    return rows


def test_a_message_ended_past_the_retention_answers_404_and_leaves_the_list_with_its_attempts(app, client, host, peers):
    connector = create_connector(client, host, "telegram", peers=peers)
    old, kept = delivered_message(app, client, host), delivered_message(app, client, host)
    end_message = "UPDATE messages SET finished_at = :at WHERE id = :id"
    backdate(app, end_message, at=now() - 91 * DAY, id=db_id(app, old["id"]))
    backdate(app, end_message, at=now() - 89 * DAY, id=db_id(app, kept["id"]))
    # The kept message's attempt is older than ATTEMPT_RETENTION: it stays as long as its message does.
    started = now() - 120 * DAY
    start_attempt = "UPDATE delivery_attempts SET created_at = :at WHERE message_id = :id"
    backdate(app, start_attempt, at=started, id=db_id(app, kept["id"]))
    assert len([d for d in deliveries(client, host, connector["id"]) if d["kind"] == "message"]) == 2

    swept = sweep(app)

    assert swept["messages_pruned"] == 1 and swept["attempts_pruned"] == 0
    answer = get_message(client, old["id"])
    assert answer.status_code == 404 and answer.get_json()["message"] == "Message not found"
    [attempt] = get_message(client, kept["id"]).get_json()["attempts"]
    assert attempt["status"] == "sent" and attempt["started_at"].startswith(started.date().isoformat())
    assert listed_messages(client, host) == [kept["id"]]
    [left] = [d for d in deliveries(client, host, connector["id"]) if d["kind"] == "message"]
    assert left["created_at"] == attempt["started_at"]
    assert sweep(app)["messages_pruned"] == 0  # idempotent


def test_a_message_still_being_sent_is_kept_however_old(app, client, host, peers):
    create_connector(client, host, "telegram", peers=peers)
    message = delivered_message(app, client, host)
    # As if it were created long ago and had not ended: retention counts from the end, never from the start.
    backdate(
        app,
        "UPDATE messages SET status = 'retrying', finished_at = NULL, due_at = :due, created_at = :at WHERE id = :id",
        due=now() + DAY,
        at=now() - 400 * DAY,
        id=db_id(app, message["id"]),
    )
    assert sweep(app)["messages_pruned"] == 0
    assert get_message(client, message["id"]).get_json()["status"] == "retrying"


def test_each_connector_keeps_its_latest_20_tests_and_checks_and_everything_recent(app, client, host, peers):
    only_old = create_connector(client, host, "telegram", name="checked long ago", peers=peers)
    mixed = create_connector(client, host, "telegram", name="a few recent", peers=peers)
    busy = create_connector(client, host, "telegram", name="checked daily", peers=peers)
    assert send_test(client, host, mixed["id"], DESTINATIONS["telegram"]).status_code == 200  # one real, recent
    [real_test] = [d["id"] for d in deliveries(client, host, mixed["id"])]

    old_ages = [timedelta(days=91 + n, hours=3) for n in range(30)]  # newest first
    old_only = add_probes(app, only_old["id"], old_ages)
    mixed_recent = add_probes(app, mixed["id"], [timedelta(days=n) for n in range(1, 5)])
    mixed_old = add_probes(app, mixed["id"], old_ages, kind=TEST)
    busy_recent = add_probes(app, busy["id"], [timedelta(days=n, hours=1) for n in range(1, 26)])
    add_probes(app, busy["id"], old_ages[:10])

    swept = sweep(app)

    assert {d["id"] for d in deliveries(client, host, only_old["id"])} == set(old_only[:KEEP_PROBES])
    # Its 5 recent ones and the 15 newest of the old: 20 in all.
    assert {d["id"] for d in deliveries(client, host, mixed["id"])} == {real_test, *mixed_recent, *mixed_old[:15]}
    assert {d["id"] for d in deliveries(client, host, busy["id"])} == set(busy_recent)
    assert swept["attempts_pruned"] == 10 + 15 + 10 and swept["messages_pruned"] == 0
    assert sweep(app)["attempts_pruned"] == 0


def test_a_sweep_prunes_at_most_its_batches_and_the_next_sweep_takes_the_rest(app, client, host, peers):
    budget = PRUNE_BATCH * PRUNE_BATCHES
    first = create_connector(client, host, "telegram", name="first", peers=peers)
    second = create_connector(client, host, "telegram", name="second", peers=peers)
    kept = delivered_message(app, client, host)
    old_messages = add_ended_messages(app, host, budget + 3)
    # The old checks are split between two connectors, so that one batch holds rows of both.
    split = PRUNE_BATCH // 2 + 7
    add_probes(app, first["id"], [timedelta(days=95, seconds=n) for n in range(split + KEEP_PROBES)])
    add_probes(app, second["id"], [timedelta(days=95, seconds=n) for n in range(budget - split + 2 + KEEP_PROBES)])

    once = sweep(app)
    assert (once["messages_pruned"], once["attempts_pruned"]) == (budget, budget)
    # The oldest went first; what is left is the three that ended last.
    assert set(listed_messages(client, host)) == {kept["id"], *(str(row["id"]) for row in old_messages[:3])}
    twice = sweep(app)
    assert (twice["messages_pruned"], twice["attempts_pruned"]) == (3, 2)
    assert listed_messages(client, host) == [kept["id"]]
    for connector in (first, second):
        assert len([d for d in deliveries(client, host, connector["id"]) if d["kind"] == "check"]) == KEEP_PROBES


def test_messages_of_many_rounds_make_smaller_batches(app, client, host):
    create_connector(client, host, "telegram")
    # Tried for days: a round or more an hour. A batch holds up to PRUNE_BATCH rounds, here one message.
    add_ended_messages(app, host, PRUNE_BATCHES + 2, rounds=PRUNE_BATCH // 2 + 1)
    assert sweep(app)["messages_pruned"] == PRUNE_BATCHES
    assert sweep(app)["messages_pruned"] == 2


def test_a_sweep_looks_at_a_bounded_number_of_connectors_and_later_sweeps_reach_the_others(app, client, host):
    made = create_connector(client, host, "telegram")  # the Host, then only the connectors below
    assert client.delete(f"/api/connectors/{made['id']}", headers=host.headers).status_code == 204
    count, taken = PRUNE_CONNECTORS + 10, now()
    connectors = [
        {
            "id": uuid.uuid4(),
            "host_id": host.id,
            "type": "telegram",
            "name": f"bot {index}",
            "config_key_id": "k",
            "config_sealed": b"\0",
            "next_check_at": taken + 30 * DAY,
        }
        for index in range(count)
    ]
    # Each has one check more than it keeps, all old: one to prune per connector.
    checks = [
        {
            "id": uuid.uuid4(),
            "connector_id": connector["id"],
            "connector_type": "telegram",
            "kind": CHECK,
            "status": VERIFIED,
            "created_at": taken - timedelta(days=100, minutes=n),
        }
        for connector in connectors
        for n in range(KEEP_PROBES + 1)
    ]
    with app.app_context():
        db.session.execute(insert(Connector), connectors)
        db.session.execute(insert(DeliveryAttempt), checks)
        db.session.commit()

    assert sweep(app)["attempts_pruned"] == PRUNE_CONNECTORS
    pruned = PRUNE_CONNECTORS
    for _ in range(30):  # each sweep misses a given connector with a chance of 10 in 2,010
        pruned += sweep(app)["attempts_pruned"]
        if pruned == count:
            break
    assert pruned == count


def test_the_retention_settings_are_what_the_sweep_keeps(app, client, host, peers, tmp_path):
    import worker.tasks  # noqa: F401 - the sweep's task, run here by the sibling's own Celery app

    connector = create_connector(client, host, "telegram", peers=peers)
    message = delivered_message(app, client, host)
    ended = now() - 3 * DAY
    backdate(app, "UPDATE messages SET finished_at = :at WHERE id = :id", at=ended, id=db_id(app, message["id"]))
    add_probes(app, connector["id"], [timedelta(days=3, minutes=n) for n in range(KEEP_PROBES + 4)])
    swept = sweep(app)  # the defaults: 90 days
    assert (swept["messages_pruned"], swept["attempts_pruned"]) == (0, 0)

    two_days = sibling_app(app, tmp_path, MESSAGE_RETENTION=str(2 * 86400), ATTEMPT_RETENTION=str(2 * 86400))
    swept = two_days.extensions["celery"].tasks["dispatch.sweep"].apply().get(timeout=20)
    assert (swept["messages_pruned"], swept["attempts_pruned"]) == (1, 4)
    assert get_message(client, message["id"]).status_code == 404
    assert len(deliveries(client, host, connector["id"])) == KEEP_PROBES


@pytest.mark.parametrize("variable", ["MESSAGE_RETENTION", "ATTEMPT_RETENTION"])
@pytest.mark.parametrize("value", ["3600", "ninety days", str(3651 * 86400)])
def test_a_retention_below_a_day_or_not_a_number_fails_fast_naming_the_variable(tmp_path, variable, value):
    env = {"INSTANCE_PATH": str(tmp_path), "JWT_SECRET_KEY": "j" * 40, "MASTER_KEY": "22" * 32, variable: value}
    with pytest.raises(ConfigError, match=variable):
        create_app(env=env)
