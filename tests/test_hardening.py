"""The service keeps working, leaks nothing and lets no one in: SSRF, tenancy, concurrency, faults, bad input."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from app import create_app
from app.channels import base
from app.channels.base import DeliveryError, ProviderSettings
from app.channels.email import EmailProvider
from app.channels.netguard import literal_host_blocked
from tests.conftest import (
    SECRET_VALUES,
    TEST_DATABASE_URL,
    TEST_REDIS_URL,
    USES_REDIS,
    _start_worker_subprocess,
    config_for,
    create_connector,
    new_host,
    service_headers,
)
from worker.tasks import TEST_MESSAGE

DESTINATIONS = {
    "email": "survivor@example.org",
    "sms": "+14155550199",
    "whatsapp": "+14155550188",
    "telegram": "123456789",
}


def send_test(client, host, connector_id, destination="survivor@example.org"):
    return client.post(
        f"/api/connectors/{connector_id}/test", json={"test_destination": destination}, headers=host.headers
    )


@pytest.fixture
def private_destinations_refused(app):
    app.config["ALLOW_PRIVATE_DESTINATIONS"] = False
    yield
    app.config["ALLOW_PRIVATE_DESTINATIONS"] = True


# --- server-side request forgery --------------------------------------------------------------------------

REFUSED_HOSTS = [
    "localhost", "LOCALHOST", "mail.localhost", "127.0.0.1", "127.1.2.3", "10.0.0.5", "172.16.3.4", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "::1", "[::1]", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "fec0::1", "2002:a9fe:a9fe::1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
]  # fmt: skip


@pytest.mark.parametrize("address", REFUSED_HOSTS)
def test_literal_private_addresses_are_refused(address):
    assert literal_host_blocked(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "smtp.example.com", "1.1.1.1"])
def test_public_addresses_and_names_pass_the_literal_check(address):
    assert not literal_host_blocked(address)


@pytest.mark.usefixtures("private_destinations_refused")
@pytest.mark.parametrize("address", ["localhost", "127.0.0.1", "169.254.169.254", "::1", "10.1.2.3", "fd00::1"])
def test_create_and_update_refuse_private_smtp_hosts_with_400(client, host, address):
    body = {"type": "email", "name": "x", "config": config_for("email", smtp_host=address)}
    refused = client.post("/api/connectors", json=body, headers=host.headers)
    assert refused.status_code == 400
    assert "smtp_host" in refused.get_json()["errors"]["json"]["config"]

    created = create_connector(client, host, "email", "public")
    update = client.put(
        f"/api/connectors/{created['id']}",
        json={"config": config_for("email", smtp_host=address)},
        headers=host.headers,
    )
    assert update.status_code == 400


@pytest.mark.usefixtures("worker")
def test_a_name_resolving_to_a_private_address_is_502_destination_blocked_whether_or_not_it_listens(
    app, client, host, peers
):
    if USES_REDIS:
        pytest.skip("the rule is read by the worker; the subprocess worker of this run allows private addresses")
    ids = []
    for name, port in (("listening", peers.smtp.port), ("closed", _closed_port())):
        config = config_for("email", peers, smtp_host="localhost", smtp_port=port)
        created = client.post(
            "/api/connectors", json={"type": "email", "name": name, "config": config}, headers=host.headers
        )
        ids.append(created.get_json()["id"])
    app.config["ALLOW_PRIVATE_DESTINATIONS"] = False
    try:
        answers = [send_test(client, host, connector_id).get_json() for connector_id in ids]
    finally:
        app.config["ALLOW_PRIVATE_DESTINATIONS"] = True
    assert [a["error_code"] for a in answers] == ["destination_blocked", "destination_blocked"]
    assert answers[0]["message"] == answers[1]["message"]  # nothing tells an open port from a closed one
    assert peers.smtp.received == []


def test_the_smtp_host_is_resolved_once_and_the_checked_address_is_used(peers, monkeypatch):
    calls: list[str] = []
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(host)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    provider = EmailProvider(ProviderSettings(timeout=2, allow_private=True))
    config = {**config_for("email", peers), "smtp_host": "mail.example.test"}
    provider.send(config, "survivor@example.org", TEST_MESSAGE)
    assert calls == ["mail.example.test"]
    assert len(peers.smtp.wait_for(1)) == 1

    blocked = EmailProvider(ProviderSettings(timeout=2, allow_private=False))
    with pytest.raises(DeliveryError) as raised:
        blocked.send(config, "survivor@example.org", TEST_MESSAGE)
    assert raised.value.code == "destination_blocked"
    assert len(peers.smtp.received) == 1


# --- secrets never leak ------------------------------------------------------------------------------------


def test_no_secret_reaches_the_logs_at_debug_level(app, client, host, peers, worker, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    for kind in ("email", "sms", "whatsapp", "telegram"):
        connector = create_connector(client, host, kind, peers=peers)
        assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 200
        peer = {"email": peers.smtp, "sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram}[kind]
        peer.mode = "auth"
        assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 502
        client.put(f"/api/connectors/{connector['id']}", json={"config": config_for(kind, peers)}, headers=host.headers)
    logged = caplog.text + capsys.readouterr().out
    worker_log = getattr(worker, "log_path", None)  # the subprocess worker of the Redis run
    if worker_log:
        time.sleep(0.5)
        logged += worker_log.read_text()
    assert "test delivery" in logged  # the worker's lines were captured too
    for secret in SECRET_VALUES:
        assert secret not in logged


# --- tenancy --------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_another_hosts_connector_is_404_on_every_endpoint_and_unchanged(app, client, host, other_host, peers):
    theirs = create_connector(client, other_host, "email", "theirs", peers=peers)
    before = _row(app, theirs["id"])
    cid = theirs["id"]
    answers = [
        client.put(f"/api/connectors/{cid}", json={"name": "stolen", "priority": 9}, headers=host.headers),
        client.put(f"/api/connectors/{cid}", json={"config": config_for("email")}, headers=host.headers),
        client.delete(f"/api/connectors/{cid}", headers=host.headers),
        send_test(client, host, cid),
        client.get(f"/api/connectors/{cid}/deliveries", headers=host.headers),
    ]
    assert [a.status_code for a in answers] == [404] * 5
    assert all(a.get_json()["message"] == "Connector not found" for a in answers)
    assert _row(app, cid) == before
    assert client.get("/api/connectors", headers=host.headers).get_json() == {"connectors": []}
    assert peers.smtp.received == []


# --- concurrency -----------------------------------------------------------------------------------------------


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


# --- faults ------------------------------------------------------------------------------------------------------


def _sibling_app(app, tmp_path: Path, **env: str):  # noqa: ANN001, ANN202
    """An app on the same database with its own broker (another folder, or another Redis db)."""
    sibling_env = {
        **os.environ,
        "INSTANCE_PATH": str(tmp_path),
        "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
        **env,
    }
    if USES_REDIS and "REDIS_URL" not in env:
        sibling_env["REDIS_URL"] = TEST_REDIS_URL.rsplit("/", 1)[0] + "/9"
    sibling = create_app(env=sibling_env)
    sibling.config["SIBLING_ENV"] = sibling_env
    return sibling


@pytest.mark.usefixtures("worker")
def test_without_a_worker_the_test_is_502_timeout_and_never_delivered_later(app, client, host, peers, tmp_path):
    lonely = _sibling_app(app, tmp_path)
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
    outcome = again.get(timeout=10)
    assert outcome["success"] is False and "already" in outcome["message"]
    time.sleep(0.5)
    assert len(peers.smtp.received) == 1


@pytest.mark.usefixtures("worker")
def test_a_worker_killed_mid_delivery_causes_no_second_message_and_a_clear_answer(app, host, peers, tmp_path):
    sibling = _sibling_app(app, tmp_path)
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
        time.sleep(peers_slow_seconds() + 0.5)  # long enough for any message in flight to land
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
    port = _closed_port()
    server = _start_redis(port, tmp_path)
    try:
        degraded = _sibling_app(app, tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0")
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


def test_bodies_over_64_kib_are_413_json(client, host):
    response = client.post(
        "/api/connectors", data=b"{" + b" " * (70 * 1024) + b"}", content_type="application/json", headers=host.headers
    )
    assert response.status_code == 413
    assert response.get_json()["code"] == 413


def test_deeply_nested_json_is_a_clear_400(client, host):
    body = '{"type": "email", "name": "x", "config": ' + "[" * 30000 + "]" * 30000 + "}"
    response = client.post("/api/connectors", data=body, content_type="application/json", headers=host.headers)
    assert response.status_code == 400
    assert response.get_json()["code"] == 400


@pytest.mark.parametrize("name", ["line\nbreak", "nul\x00byte", "bell\x07", "del\x7f"])
def test_control_characters_in_names_are_rejected_clearly(client, host, name):
    response = client.post(
        "/api/connectors", json={"type": "email", "name": name, "config": config_for("email")}, headers=host.headers
    )
    assert response.status_code == 400
    assert response.get_json()["errors"]["json"]["name"] == [
        "Must not contain control, format or line-separator characters."
    ]


def test_bad_limits_are_400(client, host):
    connector = create_connector(client, host, "email")
    for query in ("limit=-1", "limit=101", "limit=1.5", "limit="):
        assert (
            client.get(f"/api/connectors/{connector['id']}/deliveries?{query}", headers=host.headers).status_code == 400
        )


# --- helpers ------------------------------------------------------------------------------------------------------


def peers_slow_seconds() -> float:
    from tests.peers import SLOW_SECONDS

    return SLOW_SECONDS


def _wait_for_worker(flask_app, process: subprocess.Popen, log_path: Path) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 60
    while not flask_app.extensions["celery"].control.ping(timeout=0.5):
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]


def _attempt_statuses(http, host, connector_id: str) -> list[str]:  # noqa: ANN001
    answer = http.get(f"/api/connectors/{connector_id}/deliveries", headers=host.headers).get_json()
    return [attempt["status"] for attempt in answer["deliveries"]]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(port: int, folder: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


def _row(app, connector_id: str):  # noqa: ANN001, ANN202
    from app.extensions import db

    with app.app_context():
        row = db.session.execute(
            text("SELECT * FROM connectors WHERE id = :id"), {"id": _db_id(app, connector_id)}
        ).one()
        db.session.rollback()
    return tuple(row)


def _db_id(app, connector_id: str) -> object:  # noqa: ANN001
    # SQLAlchemy's Uuid is a native uuid on PostgreSQL and 32 hex characters on SQLite.
    value = uuid.UUID(connector_id)
    return value if app.config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql") else value.hex


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("sms", "api_key_sid", "SK" + "a" * 32 + "\n"),
        ("sms", "account_sid", "AC" + "b" * 32 + "\n"),
        ("whatsapp", "phone_number_id", "106540352242922\n"),
        ("whatsapp", "api_version", "v24.0\n"),
        ("telegram", "bot_token", "7012345678:AAHtgSecretToken4b2d9e8f1a3c5d7e\n"),
    ],
)
def test_a_trailing_newline_does_not_pass_a_pattern(client, host, kind, field, value):
    body = {"type": kind, "name": "x", "config": config_for(kind, **{field: value})}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]["json"]["config"]


@pytest.mark.parametrize("where", ["name", "config"])
def test_lone_surrogates_are_a_clear_400(client, host, where):
    name = '"\\udfff"' if where == "name" else '"ok"'
    username = '"\\udfff"' if where == "config" else '"mailer"'
    body = (
        '{"type": "email", "name": ' + name + ', "config": {"smtp_host": "smtp.example.com", "smtp_port": 587, '
        '"username": ' + username + ', "password": "p", "from_address": "a@example.org"}}'
    )
    response = client.post("/api/connectors", data=body, content_type="application/json", headers=host.headers)
    assert response.status_code == 400
    assert "not valid Unicode" in response.get_json()["message"]


def test_a_server_trickling_endless_replies_is_cut_off_at_the_provider_timeout():
    """A hostile SMTP host must not hold a worker thread: the whole dialogue ends at the deadline."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            while not stop.is_set():
                try:
                    conn.sendall(b"220-still greeting you\r\n")
                except OSError:
                    return
                time.sleep(0.1)

    threading.Thread(target=trickle, daemon=True).start()
    provider = EmailProvider(ProviderSettings(timeout=1.0, allow_private=True))
    config = {
        **config_for("email"),
        "smtp_host": "127.0.0.1",
        "smtp_port": listener.getsockname()[1],
        "security": "none",
    }
    started = time.monotonic()
    try:
        with pytest.raises(DeliveryError) as raised:
            provider.send(config, "survivor@example.org", TEST_MESSAGE)
    finally:
        stop.set()
        listener.close()
    assert raised.value.code == "provider_unreachable"
    assert time.monotonic() - started < 2.5


@pytest.mark.usefixtures("worker")
def test_a_job_reaching_a_worker_after_the_callers_deadline_is_not_sent(app, client, host, peers):
    connector = create_connector(client, host, "email", peers=peers)
    from app.deliveries.models import DeliveryAttempt
    from app.extensions import db

    attempt_id = uuid.uuid4()
    with app.app_context():
        db.session.add(DeliveryAttempt(id=attempt_id, connector_id=uuid.UUID(connector["id"]), destination="s***@x"))
        db.session.commit()
    late = app.extensions["celery"].send_task(
        "deliveries.send_test",
        args=[str(attempt_id), "survivor@example.org"],
        kwargs={"deadline": time.time() - 1},
        queue="email",
    )
    outcome = late.get(timeout=10)
    assert outcome["success"] is False and outcome["error_code"] == "timeout"
    time.sleep(0.3)
    assert peers.smtp.received == []


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


MALFORMED = {
    "telegram": [
        (200, {"ok": False}),
        (200, {"ok": True, "result": {}}),
        (200, [1, 2]),
        (502, b"<html>Bad Gateway</html>"),
    ],
    "whatsapp": [(200, {"messages": "x"}), (200, b"not json"), (400, {"error": {"code": 1e300, "message": "m"}})],
    "sms": [(201, [1]), (201, b"null"), (400, {"code": "x", "message": "m", "status": 400})],
}


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(("kind", "status", "payload"), [(k, s, p) for k, cases in MALFORMED.items() for s, p in cases])
def test_malformed_provider_answers_are_provider_errors(client, host, peers, monkeypatch, kind, status, payload):
    peer = {"sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram}[kind]
    real_answer = peer.answer

    def answer(method, path, headers, body):  # noqa: ANN001, ANN202
        if path.endswith("/getMe"):
            return real_answer(method, path, headers, body)
        return status, payload

    monkeypatch.setattr(peer, "answer", answer)
    connector = create_connector(client, host, kind, peers=peers)
    response = send_test(client, host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 502
    assert response.get_json()["error_code"] == "provider_error", response.get_json()


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [("email", "password", "pässword"), ("email", "username", "jösé"), ("sms", "api_key_secret", "sécret"),
     ("whatsapp", "access_token", "tøken"), ("whatsapp", "access_token", "tok\nen")],
)  # fmt: skip
def test_credentials_that_no_provider_could_carry_are_refused_at_save(client, host, kind, field, value):
    body = {"type": kind, "name": "x", "config": config_for(kind, **{field: value})}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 400
    assert field in response.get_json()["errors"]["json"]["config"]
