"""Resilience: Redis full or read-only, PostgreSQL going away and coming back, rate limits without Redis.

Each fault is made the way production meets it, on servers the test owns: a redis-server of its own (filled
past `maxmemory`, or turned into a replica as after a failover), a PostgreSQL cluster it stops and starts
(tests/pg_cluster.py), and a `celery worker` subprocess on them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from celery.signals import after_task_publish
from flask import Flask, current_app, has_app_context
from flask.testing import FlaskClient
from sqlalchemy import event
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

from app import create_app
from app.queues import DISPATCH_QUEUE, SWEEP
from tests.conftest import ROOT, USES_REDIS, Host, Peers, config_for, create_connector, new_host
from tests.pg_cluster import PgCluster
from tests.support import (
    DESTINATIONS,
    attempt_statuses,
    closed_port,
    send_test,
    sibling_app,
    start_redis,
    wait_for_worker,
)

T = TypeVar("T")
TEST_LIMIT_PER_HOUR = 10  # the test endpoint's limit per Host
# No event deliveries: their jobs would share the queues, and the worker's threads, with the test's own.
WITHOUT_EVENTS = {"EVENTS_WEBHOOK_URL": ""}


# --- Redis full, Redis read-only ----------------------------------------------------------------------------


@dataclass
class RedisRig:
    """A sibling app whose broker, result store and limiter are a redis-server of the test's own, and a worker."""

    admin: redis.Redis
    app: Flask
    http: FlaskClient
    worker: subprocess.Popen
    worker_log: Path

    def log_text(self) -> str:
        return self.worker_log.read_text(errors="replace")


def _start_worker(env: dict[str, str], log_path: Path, threads: int) -> subprocess.Popen:
    """`celery worker` as the Procfile runs it (threads pool, prefetch 1 per thread), with `threads` threads."""
    command = [
        sys.executable, "-m", "celery", "-A", "celery_app", "worker",
        "--pool", "threads", "--concurrency", str(threads),
        "--without-heartbeat", "--without-mingle", "--without-gossip", "--loglevel", "DEBUG",
    ]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen) -> None:
    # The test has its answers: a worker's warm shutdown would only add seconds, and nothing is left to keep.
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture
def redis_rig(app: Flask, tmp_path: Path) -> Iterator[Callable[..., RedisRig]]:
    """Builds the rig: a redis-server of its own, a sibling app on it, and a worker of `threads` threads."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    started: list[subprocess.Popen] = []

    def build(threads: int = 8) -> RedisRig:
        port = closed_port()
        started.append(start_redis(port, tmp_path))
        sibling = sibling_app(app, tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0", **WITHOUT_EVENTS)
        log_path = tmp_path / "worker.log"
        worker = _start_worker(sibling.config["SIBLING_ENV"], log_path, threads)
        started.append(worker)
        wait_for_worker(sibling, worker, log_path)
        return RedisRig(redis.Redis(port=port), sibling, sibling.test_client(), worker, log_path)

    yield build
    for process in reversed(started):
        _stop(process)


@contextmanager
def redis_out_of_memory(admin: redis.Redis) -> Iterator[None]:
    """Redis full, as in production: more data than `maxmemory`, and `noeviction`, so every write is refused."""
    admin.set("resilience:ballast", b"x" * 2_000_000)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1mb")
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("resilience:probe", "x")
        yield
    finally:
        admin.config_set("maxmemory", "0")
        admin.delete("resilience:ballast")


@contextmanager
def redis_read_only(admin: redis.Redis) -> Iterator[None]:
    """Redis demoted to a replica, as the old primary is after a failover: every write answers READONLY."""
    admin.execute_command("REPLICAOF", "127.0.0.1", str(closed_port()))
    try:
        with pytest.raises(redis.exceptions.ReadOnlyError):
            admin.set("resilience:probe", "x")
        yield
    finally:
        admin.execute_command("REPLICAOF", "NO", "ONE")


def _in_background(call: Callable[[], T]) -> Callable[[], T]:
    """Start `call()` in a thread; the function returned waits for its value."""
    box: dict[str, T] = {}
    thread = threading.Thread(target=lambda: box.update(value=call()), daemon=True)
    thread.start()

    def value() -> T:
        thread.join(timeout=30)
        assert "value" in box, "the call did not finish"
        return box["value"]

    return value


def _wait_until(condition: Callable[[], object], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


@contextmanager
def _counting_publishes() -> Iterator[list[str]]:
    """The ids of the tasks this process publishes while inside."""
    published: list[str] = []

    def count(headers: dict | None = None, **_: object) -> None:
        published.append((headers or {}).get("id", "?"))

    after_task_publish.connect(count, weak=False)
    try:
        yield published
    finally:
        after_task_publish.disconnect(count)


def _wait_for_fault(rig: RedisRig) -> None:
    """Until the worker's broker connection meets the fault; fails at once if the worker exits on it instead."""
    _wait_until(
        lambda: "Connection to broker lost" in rig.log_text() or rig.worker.poll() is not None,
        "the worker meets the fault",
    )
    assert rig.worker.poll() is None, rig.log_text()[-3000:]


def _assert_worker_survived(rig: RedisRig, host: Host, connector_id: str, peers: Peers) -> None:
    """The worker rode the fault out: it answers, and delivers the next test."""
    wait_for_worker(rig.app, rig.worker, rig.worker_log, seconds=30)
    before = len(peers.smtp.received)
    response = send_test(rig.http, host, connector_id)
    assert response.status_code == 200, (response.get_json(), rig.log_text()[-3000:])
    assert len(peers.smtp.wait_for(before + 1)) == before + 1
    assert rig.worker.poll() is None
    assert "Unrecoverable error" not in rig.log_text()


def test_redis_full_refuses_new_tests_503_and_a_busy_worker_survives_it(redis_rig, host, peers):
    # Production's 50 threads scaled down to one: a job waits in the worker while the thread is busy, and is
    # acknowledged when it starts, which Redis refuses when full (every MULTI is refused then).
    rig = redis_rig(threads=1)
    slow = create_connector(rig.http, host, "telegram", peers=peers)
    waiting, refused = (create_connector(rig.http, host, "email", name=f"email {n}", peers=peers) for n in range(2))
    peers.telegram.delay = 1.0
    with _counting_publishes() as published:
        busy = _in_background(lambda: send_test(rig.http, host, slow["id"], DESTINATIONS["telegram"]))
        _wait_until(lambda: attempt_statuses(rig.http, host, slow["id"]) == ["sending"], "the worker is busy")
        queued = _in_background(lambda: send_test(rig.http, host, waiting["id"]))
        # Received (so noted in Redis as unacknowledged) by the worker, which starts it when the thread is free.
        _wait_until(
            lambda: len(published) == 2 and f"[{published[1]}] received" in rig.log_text(), "the worker holds the job"
        )

    with redis_out_of_memory(rig.admin):
        full_since = time.monotonic()
        during = send_test(rig.http, host, refused["id"])
        _wait_for_fault(rig)
        time.sleep(max(0.0, 3 - (time.monotonic() - full_since)))
        assert rig.worker.poll() is None

    assert during.status_code == 503 and during.get_json()["error_code"] == "broker_unavailable"
    assert attempt_statuses(rig.http, host, refused["id"]) == ["failed"]
    # Both jobs ran; Redis could not keep their results, and the attempt log answered instead.
    for response in (busy(), queued()):
        assert response.status_code == 200, response.get_json()
    assert len(peers.telegram.received) == 1 and len(peers.smtp.received) == 1
    _assert_worker_survived(rig, host, refused["id"], peers)


def test_a_result_redis_could_not_store_is_answered_from_the_attempt_log(redis_rig, host, peers):
    rig = redis_rig()
    connector = create_connector(rig.http, host, "telegram", peers=peers)
    peers.telegram.delay = 1.0  # the provider is slow: Redis fills up while the worker waits on it
    answer = _in_background(lambda: send_test(rig.http, host, connector["id"], DESTINATIONS["telegram"]))
    _wait_until(lambda: attempt_statuses(rig.http, host, connector["id"]) == ["sending"], "the worker is sending")

    def result_refused() -> bool:
        # Celery stores the result after the task body, and only warns when the store refuses it.
        _, sent, after = rig.log_text().partition(": sent")
        return bool(sent) and any("outside body" in line and "OutOfMemoryError" in line for line in after.splitlines())

    with redis_out_of_memory(rig.admin):
        # The worker records the outcome in the database, then fails to store the result in Redis.
        _wait_until(result_refused, "the worker fails to store the result")
        response = answer()  # answered while Redis is still full: from the attempt log
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["success"] is True and body["delivery_time_ms"] >= 1000
    assert len(peers.telegram.received) == 1
    assert attempt_statuses(rig.http, host, connector["id"]) == ["sent"]


def test_redis_turned_read_only_by_a_failover_does_not_kill_the_worker(redis_rig, host, peers):
    rig = redis_rig()
    connector = create_connector(rig.http, host, "email", peers=peers)
    with redis_read_only(rig.admin):
        during = send_test(rig.http, host, connector["id"])
        _wait_for_fault(rig)
        time.sleep(2)
        assert rig.worker.poll() is None
    assert during.status_code == 503 and during.get_json()["error_code"] == "broker_unavailable"
    _assert_worker_survived(rig, host, connector["id"], peers)


def test_a_job_redelivered_after_a_redis_connection_drop_is_answered_by_the_copy_that_sends(redis_rig, host, peers):
    # Every thread busy and a job held for the next free one, as under load. When the broker connection drops (a
    # Redis restart, a failover, a proxy reset), kombu puts the held job back in the queue and the reconnected
    # worker takes it again, while the copy it already holds still runs: two copies, one claim.
    rig = redis_rig(threads=2)
    first, second, held = (
        create_connector(rig.http, host, "telegram", name=f"telegram {n}", peers=peers) for n in range(3)
    )
    peers.telegram.delay = 1.5
    with _counting_publishes() as published:
        busy = [
            _in_background(lambda c=c: send_test(rig.http, host, c["id"], DESTINATIONS["telegram"]))
            for c in (first, second)
        ]
        _wait_until(
            lambda: all(attempt_statuses(rig.http, host, c["id"]) == ["sending"] for c in (first, second)),
            "every thread is busy",
        )
        answer = _in_background(lambda: send_test(rig.http, host, held["id"], DESTINATIONS["telegram"]))
        _wait_until(
            lambda: len(published) == 3 and f"[{published[2]}] received" in rig.log_text(), "the worker holds the job"
        )
    assert rig.admin.client_kill_filter(_type="normal", skipme=True) > 0
    _wait_until(lambda: rig.log_text().count(f"[{published[2]}] received") == 2, "the worker takes the job again")

    response = answer()
    assert [r().status_code for r in busy] == [200, 200]
    _wait_until(lambda: attempt_statuses(rig.http, host, held["id"]) == ["sent"], "the test is delivered")
    time.sleep(0.3)
    assert len(peers.telegram.received) == 3  # the held job was sent once, by the copy that claimed it
    assert response.status_code == 200, response.get_json()


# --- PostgreSQL going away and coming back ------------------------------------------------------------------


@dataclass
class Postgres:
    cluster: PgCluster
    url: str


@pytest.fixture(scope="module")
def postgres(app: Flask, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A PostgreSQL server of this module's own, with the service's schema, that tests stop and start."""
    if not PgCluster.available():
        pytest.skip("PgCluster needs the PostgreSQL server binaries (initdb, postgres), and a postgres user as root")
    cluster = PgCluster()
    try:
        cluster.start()
        url = cluster.create_database("connectors")
        _migrate(url, tmp_path_factory.mktemp("migrate"))
        yield Postgres(cluster, url)
    finally:
        cluster.close()


def _migrate(url: str, instance: Path) -> None:
    """`flask db upgrade` on `url`, as the release phase runs it, in this process (faster than a subprocess)."""
    from flask_migrate import upgrade

    from app.extensions import init_migrations, limiter

    limiter_state = vars(limiter).copy()  # building an app rebinds the limiter; the session's app keeps it
    try:
        migrating = create_app(env={**os.environ, "INSTANCE_PATH": str(instance), "DATABASE_URL": url, "REDIS_URL": ""})
        init_migrations(migrating)
        with migrating.app_context():
            upgrade(directory=str(ROOT / "migrations"))
    finally:
        vars(limiter).clear()
        vars(limiter).update(limiter_state)


@pytest.fixture
def on_postgres(app: Flask, tmp_path: Path, postgres: Postgres) -> Iterator[Callable[..., Flask]]:
    """Builds a sibling app on the cluster, with a broker of its own: the embedded one, or with TEST_REDIS_URL a
    redis-server of its own (another run's workers on a shared Redis db must not take its jobs)."""
    servers: list[subprocess.Popen] = []

    def build(**env: str) -> Flask:
        broker = {"REDIS_URL": ""}
        if USES_REDIS and shutil.which("redis-server"):
            port = closed_port()
            servers.append(start_redis(port, tmp_path))
            broker = {"REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        return sibling_app(app, tmp_path, DATABASE_URL=postgres.url, **broker, **WITHOUT_EVENTS, **env)

    yield build
    postgres.cluster.start()  # for the next test, whatever this one left
    for server in servers:
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def _worker_on(flask_app: Flask, log_path: Path) -> Iterator[subprocess.Popen]:
    worker = _start_worker(flask_app.config["SIBLING_ENV"], log_path, threads=8)
    try:
        wait_for_worker(flask_app, worker, log_path)
        yield worker
    finally:
        _stop(worker)


def _assert_database_unavailable(what: str, response: TestResponse) -> None:
    assert response.status_code == 503, (what, response.status_code, response.get_data(as_text=True)[:300])
    assert response.is_json, (what, response.content_type)
    assert response.get_json()["error_code"] == "database_unavailable", (what, response.get_json())
    assert int(response.headers["Retry-After"]) > 0, what


def test_while_postgres_is_down_the_api_answers_503_json_and_recovers_without_a_restart(on_postgres, postgres, peers):
    http = on_postgres().test_client()
    host = new_host()
    kept = create_connector(http, host, "email", peers=peers)
    assert http.get("/api/connectors", headers=host.headers).status_code == 200  # the pool holds connections

    postgres.cluster.stop()
    answers = {
        "list": http.get("/api/connectors", headers=host.headers),
        "create": http.post("/api/connectors", json=_connector_body("sms"), headers=host.headers),
        "update": http.put(f"/api/connectors/{kept['id']}", json={"name": "renamed"}, headers=host.headers),
        "delete": http.delete(f"/api/connectors/{kept['id']}", headers=host.headers),
        "test": send_test(http, host, kept["id"]),
        "deliveries": http.get(f"/api/connectors/{kept['id']}/deliveries", headers=host.headers),
    }
    for what, response in answers.items():
        _assert_database_unavailable(what, response)

    postgres.cluster.start()  # same app, same client: the pool replaces its dead connections
    listed = http.get("/api/connectors", headers=host.headers)
    assert listed.status_code == 200
    assert [c["id"] for c in listed.get_json()["connectors"]] == [kept["id"]]
    assert http.put(f"/api/connectors/{kept['id']}", json={"name": "renamed"}, headers=host.headers).status_code == 200
    assert http.delete(f"/api/connectors/{kept['id']}", headers=host.headers).status_code == 204
    assert http.post("/api/connectors", json=_connector_body("sms"), headers=host.headers).status_code == 201


def test_a_create_committed_just_before_postgres_goes_away_still_answers_201(on_postgres, postgres):
    from app.connectors.models import Connector
    from app.extensions import db

    sibling = on_postgres()
    http = sibling.test_client()
    host = new_host()
    flushed: list[Connector] = []

    def ours() -> bool:
        return has_app_context() and current_app._get_current_object() is sibling

    def note_new_connector(session: Session, _context: object) -> None:
        if ours():
            flushed.extend(item for item in session.new if isinstance(item, Connector))

    def database_goes_away(_session: Session) -> None:
        if ours() and flushed and postgres.cluster.running:
            postgres.cluster.stop()

    event.listen(db.session, "after_flush", note_new_connector)
    event.listen(db.session, "after_commit", database_goes_away)
    try:
        response = http.post("/api/connectors", json=_connector_body("email"), headers=host.headers)
    finally:
        event.remove(db.session, "after_flush", note_new_connector)
        event.remove(db.session, "after_commit", database_goes_away)
    assert flushed and not postgres.cluster.running  # the database went away between the commit and the answer

    assert response.status_code == 201, response.get_data(as_text=True)[:500]
    created = response.get_json()
    assert created["id"] == str(flushed[0].id) and created["name"] == "email connector"
    postgres.cluster.start()
    listed = http.get("/api/connectors", headers=host.headers).get_json()["connectors"]
    assert [c["id"] for c in listed] == [created["id"]]


def test_the_worker_records_an_outcome_once_postgres_is_back(on_postgres, postgres, peers, tmp_path):
    sibling = on_postgres(TEST_DELIVERY_TIMEOUT="10")
    http = sibling.test_client()
    host = new_host()
    connector = create_connector(http, host, "telegram", peers=peers)
    log_path = tmp_path / "worker.log"
    with _worker_on(sibling, log_path):
        peers.telegram.delay = 1.5  # the database goes away while the provider takes its time
        answer = _in_background(lambda: send_test(http, host, connector["id"], DESTINATIONS["telegram"]))
        _wait_until(lambda: attempt_statuses(http, host, connector["id"]) == ["sending"], "the worker is sending")
        postgres.cluster.stop()
        try:
            _wait_until(
                lambda: "record: the database is unavailable" in log_path.read_text(errors="replace"),
                "the worker fails to record the outcome",
            )
            time.sleep(1.5)
        finally:
            postgres.cluster.start()
        response = answer()
    assert response.status_code == 200, response.get_json()
    assert attempt_statuses(http, host, connector["id"]) == ["sent"]
    assert len(peers.telegram.received) == 1


def test_the_sweep_closes_attempts_an_outage_left_open(on_postgres, postgres, peers, tmp_path):
    sibling = on_postgres(TEST_DELIVERY_TIMEOUT="3")
    http = sibling.test_client()
    host = new_host()
    interrupted = create_connector(http, host, "email", peers=peers)
    never_started = create_connector(http, host, "sms", peers=peers)
    with _worker_on(sibling, tmp_path / "first-worker.log") as worker:
        peers.smtp.mode = "slow"  # the server sits on the message, so the worker dies while sending
        first = _in_background(lambda: send_test(http, host, interrupted["id"]))
        _wait_until(lambda: attempt_statuses(http, host, interrupted["id"]) == ["sending"], "the worker is sending")
        worker.kill()
        worker.wait(timeout=10)
    second = _in_background(lambda: send_test(http, host, never_started["id"], DESTINATIONS["sms"]))
    _wait_until(lambda: attempt_statuses(http, host, never_started["id"]) == ["pending"], "the test is queued")

    # Both callers give up at their deadline while the database is away, so neither can close its attempt.
    postgres.cluster.stop()
    try:
        answers = [first(), second()]
    finally:
        postgres.cluster.start()
    for response in answers:
        assert response.status_code == 502 and response.get_json()["error_code"] == "timeout", response.get_json()
    assert attempt_statuses(http, host, interrupted["id"]) == ["sending"]
    assert attempt_statuses(http, host, never_started["id"]) == ["pending"]

    # Beat queues the sweep on the dispatch queue; the worker the platform restarted runs it.
    with _worker_on(sibling, tmp_path / "second-worker.log"):
        swept = sibling.extensions["celery"].send_task(SWEEP, queue=DISPATCH_QUEUE).get(timeout=10)
    assert swept["attempts_closed"] >= 2
    assert attempt_statuses(http, host, interrupted["id"]) == ["unknown"]
    assert attempt_statuses(http, host, never_started["id"]) == ["timeout"]
    assert peers.twilio.received == []


def _connector_body(kind: str) -> dict[str, object]:
    return {"type": kind, "name": f"{kind} connector", "config": config_for(kind)}


# --- Rate limits without Redis -------------------------------------------------------------------------------


def test_with_redis_down_sms_tests_answer_503_and_keep_their_limit_while_crud_answers(app, tmp_path, peers):
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    port = closed_port()
    server = start_redis(port, tmp_path)
    try:
        http = sibling_app(app, tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0", **WITHOUT_EVENTS).test_client()
        host = new_host()
        sms = create_connector(http, host, "sms", peers=peers)
    finally:
        server.terminate()
        server.wait(timeout=10)

    assert http.get("/api/connectors", headers=host.headers).status_code == 200
    email = http.post("/api/connectors", json=_connector_body("email"), headers=host.headers)
    assert email.status_code == 201
    assert http.put(f"/api/connectors/{sms['id']}", json={"priority": 1}, headers=host.headers).status_code == 200
    assert http.delete(f"/api/connectors/{email.get_json()['id']}", headers=host.headers).status_code == 204

    # Each test costs the Host an SMS: without its queue none is sent, and the limit still counts, in memory.
    for _ in range(TEST_LIMIT_PER_HOUR):
        started = time.monotonic()
        response = send_test(http, host, sms["id"], DESTINATIONS["sms"])
        assert response.status_code == 503 and response.get_json()["error_code"] == "broker_unavailable"
        assert time.monotonic() - started < 2
    over = send_test(http, host, sms["id"], DESTINATIONS["sms"])
    assert over.status_code == 429, over.get_json()
    assert peers.twilio.received == []
