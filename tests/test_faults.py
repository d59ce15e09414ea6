"""Faults: a worker missing, killed or late, a job redelivered, Redis going down, database connections dropped."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from datetime import timedelta

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout
from sqlalchemy import create_engine, text

from tests.conftest import TEST_DATABASE_URL, _start_worker_subprocess, create_connector, new_host
from tests.peers import SLOW_SECONDS
from tests.support import attempt_statuses as _attempt_statuses
from tests.support import closed_port, send_test, sibling_app
from tests.support import start_redis as _start_redis
from tests.support import wait_for_worker as _wait_for_worker


@pytest.mark.usefixtures("worker")
def test_without_a_worker_the_test_is_502_timeout_and_never_delivered_later(app, client, host, peers, tmp_path):
    lonely = sibling_app(app, tmp_path)
    lonely_client = lonely.test_client()
    connector = create_connector(lonely_client, host, "email", peers=peers)
    started = time.monotonic()
    response = send_test(lonely_client, host, connector["id"])
    assert response.status_code == 502
    body = response.get_json()
    assert (
        body["error_code"] == "timeout"
        and f"no worker finished the test within {lonely.config['TEST_DELIVERY_TIMEOUT']:g} s" in body["message"]
    )
    assert time.monotonic() - started < lonely.config["TEST_DELIVERY_TIMEOUT"] + 1
    assert (
        lonely_client.get(f"/api/connectors/{connector['id']}/deliveries", headers=host.headers).get_json()[
            "deliveries"
        ][0]["status"]
        == "timeout"
    )

    # A worker that starts afterwards finds the job expired (and its attempt closed): nothing is sent.
    worker = _start_worker_subprocess(lonely.config["SIBLING_ENV"], tmp_path / "late-worker.log")
    try:
        _wait_for_worker(lonely, worker, tmp_path / "late-worker.log")
        time.sleep(1.5)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert peers.smtp.received == []


@pytest.mark.usefixtures("worker")
def test_a_redelivered_job_does_not_send_a_second_message(app, client, host, peers):
    connector = create_connector(client, host, "email", peers=peers)
    published = []
    from celery.signals import before_task_publish

    def capture(body=None, **_):  # noqa: ANN001, ANN202
        published.append(body)

    before_task_publish.connect(capture, weak=False)
    try:
        assert send_test(client, host, connector["id"]).status_code == 200
    finally:
        before_task_publish.disconnect(capture)
    args = published[0][0]
    again = app.extensions["celery"].send_task("deliveries.send_test", args=args, queue="email")
    with pytest.raises(CeleryTimeout):  # the copy stays silent: only the claimant answers
        again.get(timeout=2)
    assert len(peers.smtp.received) == 1


@pytest.mark.usefixtures("worker")
def test_a_worker_killed_mid_delivery_causes_no_second_message_and_a_clear_answer(app, host, peers, tmp_path):
    sibling = sibling_app(app, tmp_path)
    http = sibling.test_client()
    connector = create_connector(http, host, "email", peers=peers)
    peers.smtp.mode = "slow"  # the server sits on the message, so the worker is killed while sending
    first = _start_worker_subprocess(sibling.config["SIBLING_ENV"], tmp_path / "first-worker.log")
    second = None
    try:
        _wait_for_worker(sibling, first, tmp_path / "first-worker.log")
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(response=send_test(http, host, connector["id"])))
        request.start()
        deadline = time.monotonic() + 10
        while _attempt_statuses(http, host, connector["id"]) != ["sending"]:
            assert time.monotonic() < deadline, "the worker never started sending"
            time.sleep(0.02)
        first.kill()
        first.wait(timeout=10)
        second = _start_worker_subprocess(sibling.config["SIBLING_ENV"], tmp_path / "second-worker.log")
        _wait_for_worker(sibling, second, tmp_path / "second-worker.log")
        request.join(timeout=15)
        response = answer["response"]
        assert response.status_code == 502 and response.get_json()["error_code"] == "timeout"
        time.sleep(SLOW_SECONDS + 0.5)  # long enough for any message in flight to land
        assert len(peers.smtp.received) <= 1  # at most the one the killed worker had handed over
        # The worker died during the provider call: the message may or may not have gone, and the log says so.
        assert _attempt_statuses(http, host, connector["id"]) == ["unknown"]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_going_down_keeps_crud_up_fails_tests_fast_and_recovers(app, tmp_path):
    port = closed_port()
    server = _start_redis(port, tmp_path)
    try:
        degraded = sibling_app(app, tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0")
        http = degraded.test_client()
        host = new_host()
        connector = create_connector(http, host, "email")
        assert http.get("/api/connectors", headers=host.headers).status_code == 200

        server.terminate()
        server.wait(timeout=10)
        assert http.get("/api/connectors", headers=host.headers).status_code == 200
        create_connector(http, host, "sms")
        started = time.monotonic()
        down = send_test(http, host, connector["id"])
        assert down.status_code == 503
        assert down.get_json()["error_code"] == "broker_unavailable"
        assert time.monotonic() - started < 5
        ready = http.get("/api/health/ready")
        assert ready.status_code == 503 and ready.get_json()["checks"]["redis"] == "down"

        server = _start_redis(port, tmp_path)
        deadline = time.monotonic() + 15
        while http.get("/api/health/ready").get_json()["checks"].get("redis") != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        recovered = send_test(http, host, connector["id"])
        assert recovered.status_code == 502 and recovered.get_json()["error_code"] == "timeout"  # queued again
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="PostgreSQL only")
def test_database_connections_dropped_under_the_service_are_replaced_without_errors(app, client, host):
    create_connector(client, host, "email")
    assert client.get("/api/connectors", headers=host.headers).status_code == 200
    database = app.config["SQLALCHEMY_DATABASE_URI"].rsplit("/", 1)[1]
    admin = create_engine(
        TEST_DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    others = " FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
    with admin.connect() as conn:
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid))" + others), {"d": database}).scalar_one()
        # pg_terminate_backend only signals: wait until the sessions are really gone, as after a restart.
        for _ in range(100):
            if conn.execute(text("SELECT count(*)" + others), {"d": database}).scalar_one() == 0:
                break
            time.sleep(0.05)
    admin.dispose()
    assert killed >= 1
    statuses = [client.get("/api/connectors", headers=host.headers).status_code for _ in range(5)]
    assert statuses == [200] * 5


@pytest.mark.usefixtures("worker")
def test_a_job_reaching_a_worker_after_the_callers_deadline_is_not_sent(app, client, host, peers):
    connector = create_connector(client, host, "email", peers=peers)
    from app.attempts import DeliveryAttempt
    from app.extensions import db
    from app.timeutil import db_now

    attempt_id = uuid.uuid4()
    with app.app_context():
        past = db_now() - timedelta(seconds=1)  # the caller's deadline, on the database's clock
        db.session.add(
            DeliveryAttempt(
                id=attempt_id, connector_id=uuid.UUID(connector["id"]), destination="s***@x", deadline_at=past
            )
        )
        db.session.commit()
    late = app.extensions["celery"].send_task(
        "deliveries.send_test", args=[str(attempt_id), "survivor@example.org"], queue="email"
    )
    outcome = late.get(timeout=10)
    assert outcome["success"] is False and outcome["error_code"] == "timeout"
    time.sleep(0.3)
    assert peers.smtp.received == []
    # Its attempt is closed, not left pending for ever.
    [attempt] = client.get(f"/api/connectors/{connector['id']}/deliveries", headers=host.headers).get_json()[
        "deliveries"
    ]
    assert (attempt["status"], attempt["error_code"]) == ("timeout", "timeout")
