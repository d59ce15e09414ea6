"""Concurrency: simultaneous creates, deletes, rate-limited calls, trust-store builds and config changes."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from app import create_app
from app.channels import base
from app.channels.base import OutgoingMessage
from app.deliveries.jobs import Job
from app.messages.dispatch import record_send
from app.outcomes import Outcome
from app.timeutil import utcnow
from tests.conftest import TEST_DATABASE_URL, config_for, create_connector, new_host, service_headers
from tests.support import attempt_statuses, run_periodic, send_test


def _concurrently(count: int, call):  # noqa: ANN001, ANN202
    barrier = threading.Barrier(count)

    def run(index: int):  # noqa: ANN202
        barrier.wait()
        return call(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_creates_of_one_type_and_name_give_one_201_and_the_rest_409(client):
    hosts = [new_host() for _ in range(2)]
    body = {"type": "email", "name": "Same", "config": config_for("email")}
    statuses = _concurrently(
        20, lambda i: client.post("/api/connectors", json=body, headers=hosts[i % 2].headers).status_code
    )
    assert sorted(statuses) == [201, 201] + [409] * 18


def test_concurrent_deletes_of_the_last_two_connectors_never_leave_none_while_the_will_is_active(client):
    for _ in range(8):
        host = new_host()
        ids = [create_connector(client, host, kind)["id"] for kind in ("email", "sms")]
        assert (
            client.put(
                f"/api/internal/hosts/{host.id}/will", json={"active": True}, headers=service_headers()
            ).status_code
            == 200
        )
        paths = [f"/api/connectors/{connector_id}" for connector_id in ids]
        headers = host.headers
        statuses = _concurrently(
            2, lambda i, paths=paths, headers=headers: client.delete(paths[i], headers=headers).status_code
        )
        assert sorted(statuses) == [204, 409]
        assert len(client.get("/api/connectors", headers=host.headers).get_json()["connectors"]) == 1


def test_rate_limit_holds_under_concurrency(client):
    host = new_host()
    statuses = _concurrently(
        50,
        lambda i: (
            client.post(
                "/api/connectors",
                json={"type": "email", "name": f"n{i}", "config": config_for("email")},
                headers=host.headers,
            ).status_code
        ),
    )
    assert statuses.count(201) == 10
    assert statuses.count(429) == 40


def test_a_worker_pool_starting_together_builds_one_trust_store(monkeypatch):
    # Each context is ~0.9 MiB held by the thread's HTTP client; fifty threads used to build up to fifty.
    monkeypatch.setattr(base, "_tls", None)
    contexts = _concurrently(16, lambda _: base.tls_context())
    assert len({id(context) for context in contexts}) == 1
    assert contexts[0].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.usefixtures("worker")
def test_a_verdict_on_a_config_replaced_meanwhile_does_not_verify_the_new_one(client, host, peers):
    connector = create_connector(client, host, "telegram", peers=peers)
    peers.telegram.delay = 0.6
    answer: dict = {}
    sending = threading.Thread(target=lambda: answer.update(r=send_test(client, host, connector["id"], "123456789")))
    sending.start()
    time.sleep(0.3)
    replaced = client.put(
        f"/api/connectors/{connector['id']}",
        json={"config": config_for("telegram", bot_token="7012345678:AAHanotherTokenAAAAAAAAAAAAAAAAAAAA")},
        headers=host.headers,
    )
    assert replaced.status_code == 200
    sending.join(timeout=10)
    assert answer["r"].status_code == 200  # the old config worked...
    listed = client.get("/api/connectors", headers=host.headers).get_json()["connectors"][0]
    assert listed["is_verified"] is False  # ...which says nothing about the new one


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL row locks (SQLite has one writer at a time)")
@pytest.mark.usefixtures("worker")
def test_a_send_being_recorded_waits_for_its_connector_before_it_holds_its_attempt(app, client, host, peers):
    # A delete locks the connector, then its attempts (their connector_id is set NULL). The worker recording a
    # send must take them in the same order, or each holds what the other waits for.
    connector = create_connector(client, host, "email", peers=peers)
    body = {"purpose": "notification", "recipient": {"email": "ana@example.org"}, "text": "Hello"}
    headers = {**service_headers(), "Idempotency-Key": "lock-order"}
    message_id = client.post(f"/api/internal/hosts/{host.id}/messages", json=body, headers=headers).get_json()["id"]
    for _ in range(200):
        shown = client.get(f"/api/internal/messages/{message_id}", headers=service_headers()).get_json()
        if shown["status"] == "delivered":
            break
        time.sleep(0.1)
    assert shown["status"] == "delivered", shown

    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    with engine.begin() as setup:  # back to the moment the provider has answered and the worker records it
        setup.execute(text("UPDATE messages SET status = 'sending' WHERE id = :m"), {"m": message_id})
        attempt_id, sealed = setup.execute(
            text(
                "UPDATE delivery_attempts SET status = 'sending', finished_at = NULL WHERE message_id = :m "
                "RETURNING id, (SELECT config_sealed FROM connectors WHERE id = :c)"
            ),
            {"m": message_id, "c": connector["id"]},
        ).one()
    job = Job(
        attempt_id=attempt_id,
        kind="message",
        connector_id=uuid.UUID(connector["id"]),
        connector_type="email",
        config={},
        sealed=sealed,
        deadline=time.monotonic() + 300,
        destination="ana@example.org",
        message=OutgoingMessage(subject="s", text="t"),
        message_id=uuid.UUID(message_id),
    )
    errors: list[BaseException] = []

    def record() -> None:
        with app.app_context():
            try:
                record_send(job, Outcome(success=True, message="sent", delivery_time_ms=5))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

    with engine.connect() as deleting, engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
        deleting.execute(text("SET lock_timeout = '5s'"))
        deleting.execute(text("SELECT id FROM connectors WHERE id = :c FOR UPDATE"), {"c": connector["id"]})
        holder = deleting.execute(text("SELECT pg_backend_pid()")).scalar_one()
        recorder = threading.Thread(target=record)
        recorder.start()
        blocked = text("SELECT count(*) FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))")
        for _ in range(200):  # until the recorder waits for the connector this delete holds
            if watch.execute(blocked, {"holder": holder}).scalar_one():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the recorder never waited for the connector's row")
        # It waits for the connector and holds no attempt: the delete can take the attempt at once.
        try:
            held = deleting.execute(
                text("SELECT id FROM delivery_attempts WHERE id = :a FOR UPDATE NOWAIT"), {"a": attempt_id}
            ).all()
        except OperationalError as exc:
            pytest.fail(f"the recorder holds the attempt while it waits for the connector: {exc.orig}")
        deleting.rollback()
    recorder.join(15)
    engine.dispose()
    assert not recorder.is_alive()
    assert len(held) == 1 and errors == []
    assert client.get(f"/api/internal/messages/{message_id}", headers=service_headers()).get_json()["status"] == (
        "delivered"
    )


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL row and advisory locks (SQLite has one writer)")
def test_an_update_and_a_delete_of_one_connector_at_once_never_deadlock(client):
    # Both write an event: the events' lock must come after the connector's row lock in both, or each can
    # hold what the other waits for.
    outcomes = []
    for round_ in range(12):
        host = new_host()
        connector = create_connector(client, host, "email")
        create_connector(client, host, "sms")
        path = f"/api/connectors/{connector['id']}"
        calls = [
            lambda path=path, host=host: client.put(path, json={"name": "renamed"}, headers=host.headers),
            lambda path=path, host=host: client.delete(path, headers=host.headers),
        ]
        answers = _concurrently(2, lambda i, calls=calls: calls[i]())
        outcomes.append((round_, answers[0].status_code, answers[1].status_code))
    assert all(put in (200, 404) and delete == 204 for _, put, delete in outcomes), outcomes


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL row locks (SQLite has one writer at a time)")
@pytest.mark.usefixtures("worker")
def test_the_sweep_leaves_an_attempt_a_delete_holds_to_the_next_sweep_and_closes_the_rest(app, client, host):
    # A delete holds its connector, then its attempts (their connector_id is set NULL). A sweep that waited for
    # one of them while holding others could close a circle of waits: it skips what another transaction holds.
    kept = create_connector(client, host, "email")
    deleted = create_connector(client, host, "sms")
    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    overdue = utcnow() - timedelta(minutes=1)
    with engine.begin() as setup:  # each connector's test, its worker gone mid-call, past its deadline
        for connector in (kept, deleted):
            setup.execute(
                text(
                    "INSERT INTO delivery_attempts (id, connector_id, connector_type, kind, status, created_at, "
                    "deadline_at) VALUES (:id, :connector, :type, 'test', 'sending', :at, :at)"
                ),
                {"id": uuid.uuid4(), "connector": connector["id"], "type": connector["type"], "at": overdue},
            )
    with engine.connect() as deleting:
        deleting.execute(text("DELETE FROM connectors WHERE id = :c"), {"c": deleted["id"]})  # not committed yet
        try:
            run_periodic(app, "dispatch.sweep")
        except CeleryTimeoutError:
            pytest.fail("the sweep waited for the attempt the delete holds")
        assert attempt_statuses(client, host, kept["id"]) == ["unknown"]
        assert attempt_statuses(client, host, deleted["id"]) == ["sending"]  # held: left as it was
        deleting.rollback()  # the delete gave up after all
    engine.dispose()
    run_periodic(app, "dispatch.sweep")
    assert attempt_statuses(client, host, deleted["id"]) == ["unknown"]


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL row locks (SQLite has one writer at a time)")
def test_re_sealing_does_not_wait_for_an_attempt_being_created_on_the_connector(app, client, host, service_env):
    # An attempt's insert holds its connector's key (FOR KEY SHARE) until it commits; re-sealing writes only the
    # sealed config (FOR NO KEY UPDATE), so neither waits for the other, nor closes a circle with what it holds.
    connector = create_connector(client, host, "email")
    rotated = create_app(env={**service_env, "MASTER_KEY": "44" * 32, "OLD_MASTER_KEYS": service_env["MASTER_KEY"]})
    engine = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])
    answer: dict = {}
    with engine.connect() as creating:  # a test or check attempt being created, not committed yet
        creating.execute(
            text(
                "INSERT INTO delivery_attempts (id, connector_id, connector_type, kind, status, created_at) "
                "VALUES (:id, :connector, 'email', 'check', 'pending', :at)"
            ),
            {"id": uuid.uuid4(), "connector": connector["id"], "at": utcnow()},
        )
        resealing = threading.Thread(
            target=lambda: answer.update(result=rotated.test_cli_runner().invoke(args=["reseal-configs"]))
        )
        resealing.start()
        resealing.join(10)
        waited = resealing.is_alive()
        creating.rollback()
    resealing.join(15)
    engine.dispose()
    assert not waited, "re-sealing waited for the attempt's insert"
    result = answer["result"]
    assert result.exit_code == 0 and "re-sealed 1 connector(s)" in result.output, (result.output, result.exception)
