"""The Procfile's processes, started as subprocesses and driven through HTTP only.

Each stack runs `release`, then `web` and `worker`, exactly as the Procfile writes them (through `sh -c`),
with nothing but the environment a deployment would give them. Two stacks: PostgreSQL + Redis (when
TEST_DATABASE_URL and TEST_REDIS_URL are set) and the embedded defaults (SQLite and the filesystem broker
in INSTANCE_PATH), which always runs. Provider traffic goes to loopback peers only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import requests
from sqlalchemy import create_engine, text

from tests.conftest import (
    SMTP_PASSWORD,
    SMTP_USER,
    TELEGRAM_TOKEN,
    TEST_DATABASE_URL,
    TEST_REDIS_URL,
    TWILIO_ACCOUNT_SID,
    TWILIO_KEY_SID,
    TWILIO_SECRET,
    WHATSAPP_PHONE_ID,
    WHATSAPP_TOKEN,
    config_for,
    make_token,
)
from tests.peers import SmtpPeer, TelegramPeer, TwilioPeer, WhatsAppPeer, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
PROCFILE = ROOT / "Procfile"
KINDS = ("email", "sms", "whatsapp", "telegram")
QUEUES = (*KINDS, "dispatch")
READY_SECONDS = 60
TEST_DELIVERY_TIMEOUT = 4
E2E_REDIS_DB = 7

JWT_SECRET = "e2e-jwt-secret-" + "k3" * 20
MASTER_KEY = "5a" * 32

WRONG_SECRETS = {
    "email": {"password": "e2e-wrong-smtp-pw-0d7e31"},
    "sms": {"api_key_secret": "e2e-wrong-twilio-secret-6b2a90"},
    "whatsapp": {"access_token": "EAAe2e-wrong-wa-token-3f8c17"},
    "telegram": {"bot_token": "7098765432:AAE2eWrongTelegramToken9d4c2b7a1e0f"},
}
CONFIG_SECRETS = (
    SMTP_PASSWORD,
    TWILIO_SECRET,
    WHATSAPP_TOKEN,
    TELEGRAM_TOKEN,
    TELEGRAM_TOKEN.partition(":")[2],
    *(value for secrets in WRONG_SECRETS.values() for value in secrets.values()),
    WRONG_SECRETS["telegram"]["bot_token"].partition(":")[2],
)

DESTINATIONS = {
    "email": "survivor@example.org",
    "sms": "+14155550199",
    "whatsapp": "+14155550188",
    "telegram": "123456789",
}


def procfile() -> dict[str, str]:
    """The Procfile's process types and their command lines."""
    commands: dict[str, str] = {}
    for line in PROCFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, command = line.partition(":")
        commands[name.strip()] = command.strip()
    return commands


# --- provider peers --------------------------------------------------------------------------------------------


@dataclass
class E2EPeers:
    smtp: SmtpPeer
    twilio: TwilioPeer
    whatsapp: WhatsAppPeer
    telegram: TelegramPeer

    def of(self, kind: str) -> Any:
        return {"email": self.smtp, "sms": self.twilio, "whatsapp": self.whatsapp, "telegram": self.telegram}[kind]

    def all(self) -> list[Any]:
        return [self.smtp, self.twilio, self.whatsapp, self.telegram]

    def reset(self) -> None:
        for peer in self.all():
            peer.reset()


@pytest.fixture(scope="module")
def e2e_peers() -> Iterator[E2EPeers]:
    started = E2EPeers(
        smtp=SmtpPeer(SMTP_USER, SMTP_PASSWORD).start(),
        twilio=TwilioPeer(
            api_key_sid=TWILIO_KEY_SID, api_key_secret=TWILIO_SECRET, account_sid=TWILIO_ACCOUNT_SID
        ).start(),
        whatsapp=WhatsAppPeer(access_token=WHATSAPP_TOKEN, phone_number_id=WHATSAPP_PHONE_ID).start(),
        telegram=TelegramPeer(bot_token=TELEGRAM_TOKEN).start(),
    )
    yield started
    for peer in started.all():
        peer.stop()


@pytest.fixture
def providers(e2e_peers: E2EPeers) -> Iterator[E2EPeers]:
    """The loopback provider peers, answering ok, with nothing received yet."""
    e2e_peers.reset()
    yield e2e_peers
    e2e_peers.reset()


# --- the stack --------------------------------------------------------------------------------------------


@dataclass
class Host:
    id: uuid.UUID
    headers: dict[str, str]


def new_host() -> Host:
    host_id = uuid.uuid4()
    return Host(host_id, {"Authorization": f"Bearer {make_token(str(host_id), secret=JWT_SECRET)}"})


def service_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token('will-service', secret=JWT_SECRET, role='service')}"}


@dataclass
class Stack:
    name: str
    env: dict[str, str]
    logs: Path
    uses_redis: bool
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base_url = f"http://127.0.0.1:{self.env['PORT']}"
        self.http = requests.Session()
        self.http.trust_env = False  # no proxy: loopback only

    # processes

    def _files(self, process: str) -> tuple[Path, Path]:
        return self.logs / f"{process}.stdout", self.logs / f"{process}.stderr"

    def release(self) -> None:
        out, err = self._files("release")
        with out.open("ab") as stdout, err.open("ab") as stderr:
            finished = subprocess.run(
                ["/bin/sh", "-c", procfile()["release"]],
                cwd=ROOT,
                env=self.env,
                stdout=stdout,
                stderr=stderr,
                timeout=60,
                start_new_session=True,
            )
        assert finished.returncode == 0, f"release failed:\n{self.output('release')}"

    def start(self, process: str) -> None:
        out, err = self._files(process)
        with out.open("ab") as stdout, err.open("ab") as stderr:
            self.processes[process] = subprocess.Popen(
                ["/bin/sh", "-c", procfile()[process]],
                cwd=ROOT,
                env=self.env,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )

    def stop(self, process: str, grace: float = 20) -> None:
        popen = self.processes.pop(process, None)
        if popen is None:
            return
        _signal_group(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait(timeout=10)
        _signal_group(popen.pid, signal.SIGKILL)  # whatever of the group outlived its leader

    def stop_all(self) -> None:
        for process in list(self.processes):
            self.stop(process)

    def output(self, *processes: str) -> str:
        names = processes or ("release", "web", "worker")
        parts = []
        for process in names:
            for path in self._files(process):
                if path.exists():
                    parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)

    def stdout(self, process: str) -> str:
        path = self._files(process)[0]
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, seconds: float = READY_SECONDS) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        last: Any = None
        while time.monotonic() < deadline:
            for process, popen in self.processes.items():
                if popen.poll() is not None:
                    pytest.fail(f"{process} exited with {popen.returncode} before ready:\n{self.output()[-6000:]}")
            try:
                response = self.http.get(f"{self.base_url}/api/health/ready", timeout=5)
                last = (response.status_code, response.text)
                if response.status_code == 200:
                    return response.json()
            except requests.RequestException as exc:
                last = repr(exc)
            time.sleep(0.2)
        pytest.fail(f"{self.name} not ready within {seconds:g} s; last answer {last!r}:\n{self.output()[-6000:]}")

    # HTTP

    def request(self, method: str, path: str, host: Host | None = None, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if host is not None:
            headers.update(host.headers)
        for value in headers.values():
            if value.startswith("Bearer "):
                self.tokens.append(value.removeprefix("Bearer "))
        kwargs.setdefault("timeout", TEST_DELIVERY_TIMEOUT + 10)
        return self.http.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)

    def create(self, host: Host, kind: str, config: dict[str, Any], name: str | None = None, **fields: Any) -> dict:
        body = {"type": kind, "name": name or f"{kind} connector", "config": config, **fields}
        response = self.request("POST", "/api/connectors", host, json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def listed(self, host: Host) -> list[dict[str, Any]]:
        response = self.request("GET", "/api/connectors", host)
        assert response.status_code == 200, response.text
        return response.json()["connectors"]

    def send_test(self, host: Host, connector_id: str, destination: str) -> requests.Response:
        return self.request(
            "POST", f"/api/connectors/{connector_id}/test", host, json={"test_destination": destination}
        )

    def set_will(self, host_id: uuid.UUID, active: bool, headers: dict[str, str]) -> requests.Response:
        return self.request("PUT", f"/api/internal/hosts/{host_id}/will", json={"active": active}, headers=headers)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def base_env(instance: Path, providers: E2EPeers) -> dict[str, str]:
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.defpath]),
        "PORT": str(free_port()),
        "JWT_SECRET_KEY": JWT_SECRET,
        "MASTER_KEY": MASTER_KEY,
        "ALLOW_PRIVATE_DESTINATIONS": "true",
        "TEST_DELIVERY_TIMEOUT": str(TEST_DELIVERY_TIMEOUT),
        "PROVIDER_TIMEOUT": "1",
        "TWILIO_API_BASE_URL": providers.twilio.base_url,
        "WHATSAPP_API_BASE_URL": providers.whatsapp.base_url,
        "TELEGRAM_API_BASE_URL": providers.telegram.base_url,
        "INSTANCE_PATH": str(instance),
        "WORKER_CONCURRENCY": "4",
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "DEBUG",
    }


def _admin_engine(url: str) -> Any:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")


def _redis_url_with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture(scope="module", params=["postgres_redis", "embedded"])
def stack(
    request: pytest.FixtureRequest, e2e_peers: E2EPeers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    kind = request.param
    if kind == "postgres_redis" and not (TEST_DATABASE_URL and TEST_REDIS_URL):
        pytest.skip("set TEST_DATABASE_URL and TEST_REDIS_URL to run the stack on PostgreSQL and Redis")
    root = tmp_path_factory.mktemp(f"e2e-{kind}")
    logs, instance = root / "logs", root / "instance"
    logs.mkdir()
    env = base_env(instance, e2e_peers)

    db_name = None
    if kind == "postgres_redis":
        db_name = f"connectors_e2e_{uuid.uuid4().hex[:10]}"
        admin = _admin_engine(TEST_DATABASE_URL)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        admin.dispose()
        env["DATABASE_URL"] = f"{TEST_DATABASE_URL.rpartition('/')[0]}/{db_name}"
        current_db = urlsplit(TEST_REDIS_URL).path.strip("/") or "0"
        redis_db = E2E_REDIS_DB if current_db != str(E2E_REDIS_DB) else E2E_REDIS_DB + 1
        env["REDIS_URL"] = _redis_url_with_db(TEST_REDIS_URL, redis_db)

    started = Stack(kind, env, logs, uses_redis=kind == "postgres_redis")
    try:
        if started.uses_redis:
            redis.Redis.from_url(env["REDIS_URL"]).flushdb()
        started.release()
        started.start("web")
        started.start("worker")
        started.wait_ready()
        yield started
    finally:
        started.stop_all()
        if db_name:
            admin = _admin_engine(TEST_DATABASE_URL)
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()
            redis.Redis.from_url(env["REDIS_URL"]).flushdb()


def json_lines(output: str) -> list[dict[str, Any]]:
    entries = []
    for line in output.splitlines():
        if line.startswith("{"):
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
    return entries


def wait_for_log(stack: Stack, process: str, predicate: Any, seconds: float = 5) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        matches = [entry for entry in json_lines(stack.stdout(process)) if predicate(entry)]
        if matches or time.monotonic() > deadline:
            return matches
        time.sleep(0.1)


# --- the contract -----------------------------------------------------------------------------------------


def test_release_created_the_schema_and_the_web_answers_liveness(stack):
    response = stack.request("GET", "/api/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "Running upgrade" in stack.output("release")


def test_request_id_is_echoed_and_written_in_the_web_json_log(stack):
    request_id = f"e2e-{uuid.uuid4().hex}"
    response = stack.request("GET", "/api/health", headers={"X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == request_id

    host = new_host()
    listed = stack.request("GET", "/api/connectors", host, headers={"X-Request-ID": request_id + "-list"})
    assert listed.headers["X-Request-ID"] == request_id + "-list"

    entries = wait_for_log(stack, "web", lambda entry: entry.get("request_id") == request_id)
    assert entries, f"no JSON log line with request_id {request_id}:\n{stack.output('web')[-3000:]}"
    assert any(entry.get("route") == "/api/health" and entry.get("status") == 200 for entry in entries)
    listed_entries = wait_for_log(stack, "web", lambda entry: entry.get("request_id") == request_id + "-list")
    assert listed_entries and listed_entries[0]["host_id"] == str(host.id)


def test_an_unusable_request_id_is_replaced_by_a_generated_one(stack):
    response = stack.request("GET", "/api/health", headers={"X-Request-ID": "not a valid id"})
    generated = response.headers["X-Request-ID"]
    assert generated != "not a valid id"
    assert re.fullmatch(r"[0-9a-f]{32}", generated), generated


def test_readiness_is_200_with_every_dependency_checked(stack):
    response = stack.request("GET", "/api/health/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    expected = {"database": "ok", **{f"worker:{queue}": "ok" for queue in QUEUES}}
    if stack.uses_redis:
        expected["redis"] = "ok"
    assert body["checks"] == expected


def test_connectors_of_every_type_are_created_listed_updated_and_deleted(stack, providers):
    host, stranger = new_host(), new_host()
    created = {}
    for priority, kind in zip((3, 1, 2, 0), KINDS, strict=True):
        body = stack.create(host, kind, config_for(kind, providers), priority=priority)
        assert set(body) == {"id", "type", "name", "is_verified", "priority", "created_at"}
        assert (body["type"], body["priority"], body["is_verified"]) == (kind, priority, False)
        created[kind] = body

    listed = stack.listed(host)
    assert [item["type"] for item in listed] == ["telegram", "sms", "whatsapp", "email"]
    assert stack.listed(stranger) == []

    email_id = created["email"]["id"]
    updated = stack.request("PUT", f"/api/connectors/{email_id}", host, json={"name": "SMTP Updated", "priority": 1})
    assert updated.status_code == 200, updated.text
    assert (updated.json()["name"], updated.json()["priority"]) == ("SMTP Updated", 1)
    changed_type = stack.request("PUT", f"/api/connectors/{email_id}", host, json={"type": "sms"})
    assert changed_type.status_code == 400
    assert stack.request("PUT", f"/api/connectors/{email_id}", stranger, json={"name": "x"}).status_code == 404
    unknown_field = stack.request(
        "POST", "/api/connectors", host, json={"type": "telegram", "name": "t2", "config": {"bot_token": "1", "x": 1}}
    )
    assert unknown_field.status_code == 400 and unknown_field.json()["code"] == 400

    assert stack.request("DELETE", f"/api/connectors/{email_id}", stranger).status_code == 404
    deleted = stack.request("DELETE", f"/api/connectors/{email_id}", host)
    assert deleted.status_code == 204 and deleted.content == b""
    assert stack.request("DELETE", f"/api/connectors/{email_id}", host).status_code == 404
    assert sorted(item["type"] for item in stack.listed(host)) == ["sms", "telegram", "whatsapp"]


def test_connector_responses_never_contain_the_config(stack, providers):
    host = new_host()
    texts = []
    for kind in KINDS:
        response = stack.request(
            "POST", "/api/connectors", host, json={"type": kind, "name": "n", "config": config_for(kind, providers)}
        )
        assert response.status_code == 201
        texts.append(response.text)
    texts.append(stack.request("GET", "/api/connectors", host).text)
    for secret in (SMTP_PASSWORD, TWILIO_SECRET, WHATSAPP_TOKEN, TELEGRAM_TOKEN, SMTP_USER, "noreply@bapba.example"):
        assert all(secret not in body for body in texts), secret


def test_last_connector_cannot_be_deleted_while_the_will_is_active(stack, providers):
    host = new_host()
    first = stack.create(host, "email", config_for("email", providers))
    second = stack.create(host, "telegram", config_for("telegram", providers))

    as_host = stack.set_will(host.id, True, host.headers)
    assert as_host.status_code == 403
    assert stack.set_will(host.id, True, {}).status_code == 401
    activated = stack.set_will(host.id, True, service_headers())
    assert activated.status_code == 200, activated.text
    assert activated.json() == {"host_id": str(host.id), "will_active": True}

    assert stack.request("DELETE", f"/api/connectors/{first['id']}", host).status_code == 204
    refused = stack.request("DELETE", f"/api/connectors/{second['id']}", host)
    assert refused.status_code == 409
    assert "last connector" in refused.json()["message"]
    assert [item["id"] for item in stack.listed(host)] == [second["id"]]

    assert stack.set_will(host.id, False, service_headers()).json()["will_active"] is False
    assert stack.request("DELETE", f"/api/connectors/{second['id']}", host).status_code == 204
    assert stack.listed(host) == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_test_delivery_reaches_the_provider_peer_and_verifies_the_connector(stack, providers, kind):
    host = new_host()
    connector = stack.create(host, kind, config_for(kind, providers))
    response = stack.send_test(host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["message"] == "Test message sent successfully"
    assert isinstance(body["delivery_time_ms"], int) and 0 <= body["delivery_time_ms"] < TEST_DELIVERY_TIMEOUT * 1000

    received = providers.of(kind).wait_for(1)
    assert len(received) == 1, received
    message = received[0]
    if kind == "email":
        assert message["rcpt_tos"] == [DESTINATIONS["email"]] and message["login"] == SMTP_USER
        assert "BAPBA connector test" in message["data"]
    elif kind == "sms":
        assert (message["to"], message["from"], message["account"]) == (
            DESTINATIONS["sms"],
            "+14155550100",
            TWILIO_ACCOUNT_SID,
        )
    elif kind == "whatsapp":
        assert message["to"] == DESTINATIONS["whatsapp"].lstrip("+")
        assert message["phone_number_id"] == WHATSAPP_PHONE_ID
    else:
        assert message["chat_id"] == DESTINATIONS["telegram"] and "BAPBA" in message["text"]

    assert [item["is_verified"] for item in stack.listed(host)] == [True]
    attempts = stack.request("GET", f"/api/connectors/{connector['id']}/deliveries?limit=5", host)
    assert attempts.status_code == 200
    [attempt] = attempts.json()["deliveries"]
    assert attempt["status"] == "sent" and attempt["error_code"] is None
    assert attempt["destination"] != DESTINATIONS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_a_test_delivery_with_wrong_credentials_is_502_auth_failed_without_the_secret(stack, providers, kind):
    host = new_host()
    connector = stack.create(host, kind, config_for(kind, providers, **WRONG_SECRETS[kind]))
    response = stack.send_test(host, connector["id"], DESTINATIONS[kind])
    assert response.status_code == 502, response.text
    body = response.json()
    assert (body["success"], body["error_code"], body["code"]) == (False, "auth_failed", 502)
    for secret in CONFIG_SECRETS:
        assert secret not in response.text
    assert providers.of(kind).received == []
    assert [item["is_verified"] for item in stack.listed(host)] == [False]
    [attempt] = stack.request("GET", f"/api/connectors/{connector['id']}/deliveries", host).json()["deliveries"]
    assert (attempt["status"], attempt["error_code"]) == ("failed", "auth_failed")


def test_the_eleventh_create_by_one_host_is_429_and_other_hosts_are_unaffected(stack, providers):
    host = new_host()
    config = config_for("telegram", providers)
    for number in range(10):
        stack.create(host, "telegram", config, name=f"bot {number}")
    limited = stack.request(
        "POST", "/api/connectors", host, json={"type": "telegram", "name": "bot 10", "config": config}
    )
    assert limited.status_code == 429
    assert limited.json()["code"] == 429
    assert int(limited.headers["Retry-After"]) > 60
    assert limited.headers["X-RateLimit-Limit"] == "10"
    assert len(stack.listed(host)) == 10
    stack.create(new_host(), "telegram", config)


def test_the_eleventh_test_delivery_by_one_host_is_429_and_reaches_no_provider(stack, providers):
    host = new_host()
    connector = stack.create(host, "telegram", config_for("telegram", providers))
    for _ in range(10):
        assert stack.send_test(host, connector["id"], DESTINATIONS["telegram"]).status_code == 200
    assert len(providers.telegram.wait_for(10)) == 10
    limited = stack.send_test(host, connector["id"], DESTINATIONS["telegram"])
    assert limited.status_code == 429 and limited.json()["code"] == 429
    time.sleep(0.5)
    assert len(providers.telegram.received) == 10


def test_no_config_secret_or_key_appears_in_the_output_of_any_process(stack, providers):
    # Exercise every path that handles a decrypted config once more, successes and failures alike.
    host = new_host()
    for kind in KINDS:
        good = stack.create(host, kind, config_for(kind, providers), name=f"{kind} good")
        assert stack.send_test(host, good["id"], DESTINATIONS[kind]).status_code == 200
    providers.telegram.mode = "reject"
    bad = stack.create(host, "telegram", config_for("telegram", providers), name="telegram rejected")
    assert stack.send_test(host, bad["id"], DESTINATIONS["telegram"]).json()["error_code"] == "destination_rejected"

    output = stack.output()
    assert "test delivery" in stack.output("worker"), "the worker logged nothing about its deliveries"
    assert json_lines(stack.output("web")), "the web logged no JSON lines"
    leaked = [secret for secret in (*CONFIG_SECRETS, JWT_SECRET, MASTER_KEY, *stack.tokens) if secret in output]
    assert leaked == [], f"secrets found in process output: {leaked}"


def test_the_worker_logs_json_at_the_level_log_level_sets(stack, providers):
    # LOG_LEVEL=DEBUG governs every process, the worker included, once it has finished starting.
    host = new_host()
    connector = stack.create(host, "telegram", config_for("telegram", providers))
    assert stack.send_test(host, connector["id"], DESTINATIONS["telegram"]).status_code == 200
    entries = wait_for_log(stack, "worker", lambda entry: "test delivery" in entry.get("message", ""))
    assert entries and entries[0]["logger"] == "worker.tasks", stack.output("worker")[-3000:]

    logged = json_lines(stack.stdout("worker"))
    ready = [index for index, entry in enumerate(logged) if entry.get("message", "").endswith(" ready.")]
    assert ready, "the worker never logged that it was ready"
    after_start = logged[ready[0] + 1 :]
    assert any(entry["level"] == "debug" for entry in after_start), (
        "with LOG_LEVEL=DEBUG the worker logged nothing below INFO once started: "
        f"{sorted({entry['level'] for entry in after_start})}"
    )


@contextlib.contextmanager
def worker_stopped(stack: Stack) -> Iterator[None]:
    """Stop the worker process; start it again afterwards and wait until the stack is ready."""
    stack.stop("worker")
    try:
        yield
    finally:
        stack.start("worker")
        stack.wait_ready()


def test_readiness_is_503_naming_the_worker_queues_while_no_worker_runs(stack):
    with worker_stopped(stack):
        deadline = time.monotonic() + 20
        while True:
            response = stack.request("GET", "/api/health/ready")
            if response.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["status"] == "unavailable"
        down = {f"worker:{queue}": "down" for queue in QUEUES}
        assert body["checks"] == {"database": "ok", **down, **({"redis": "ok"} if stack.uses_redis else {})}
        liveness = stack.request("GET", "/api/health")
        assert (liveness.status_code, liveness.json()) == (200, {"status": "ok"})
    assert stack.request("GET", "/api/health/ready").status_code == 200


def test_a_test_with_no_worker_is_502_timeout_after_the_delivery_timeout_and_is_never_sent(stack, providers):
    host = new_host()
    connector = stack.create(host, "email", config_for("email", providers))
    assert stack.send_test(host, connector["id"], DESTINATIONS["email"]).status_code == 200
    assert len(providers.smtp.wait_for(1)) == 1

    with worker_stopped(stack):
        started = time.monotonic()
        response = stack.send_test(host, connector["id"], DESTINATIONS["email"])
        elapsed = time.monotonic() - started
        assert response.status_code == 502, response.text
        body = response.json()
        assert (body["success"], body["error_code"]) == (False, "timeout")

    # The job expired unsent: a worker that is back does not deliver it, and our own timeout left
    # the connector verified.
    time.sleep(1.5)
    assert len(providers.smtp.received) == 1
    attempts = stack.request("GET", f"/api/connectors/{connector['id']}/deliveries", host).json()["deliveries"]
    assert [(item["status"], item["error_code"]) for item in attempts] == [("timeout", "timeout"), ("sent", None)]
    assert [item["is_verified"] for item in stack.listed(host)] == [True]

    # "No worker finished the job within TEST_DELIVERY_TIMEOUT": the answer comes when that time is up.
    assert TEST_DELIVERY_TIMEOUT - 0.5 <= elapsed < TEST_DELIVERY_TIMEOUT + 2, (
        f"the timeout answer took {elapsed:.2f} s with TEST_DELIVERY_TIMEOUT={TEST_DELIVERY_TIMEOUT}"
    )
