"""The Procfile's processes as subprocesses, against loopback provider peers: the e2e tests' shared stack.

Each stack runs `release`, then `web`, `worker` and `beat`, exactly as the Procfile writes them (through
`sh -c`), with nothing but the environment a deployment would give them. Two stacks: PostgreSQL + Redis (when
TEST_DATABASE_URL and TEST_REDIS_URL are set) and the embedded defaults (SQLite and the filesystem broker in
INSTANCE_PATH), which always runs. Provider traffic goes to loopback peers only.

A test module uses the stack by binding its fixtures to module names (`stack = e2e_stack.stack`, and so on);
they are module-scoped, so each module gets its own stack, and tests that kill processes or flush the broker
disturb no other module. A module's `STACK_ENV` dict, if any, overrides settings of `base_env` for its stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from requests.adapters import HTTPAdapter
from sqlalchemy import create_engine, text
from urllib3.util.retry import Retry

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
    make_token,
)
from tests.peers import SmtpPeer, TelegramPeer, TwilioPeer, WhatsAppPeer, free_port
from tests.support import E2E_REDIS_DB_OFFSET, shifted_redis_url

ROOT = Path(__file__).resolve().parent.parent
PROCFILE = ROOT / "Procfile"
KINDS = ("email", "sms", "whatsapp", "telegram")
QUEUES = ("otp", *KINDS, "dispatch")
PROCESSES = ("release", "web", "worker", "beat")
READY_SECONDS = 60
TEST_DELIVERY_TIMEOUT = 4
PROVIDER_TIMEOUT = 1  # unless the module's STACK_ENV says otherwise; a dispatch attempt's lease is twice this
SWEEP_INTERVAL = 0.5
TEST_WAITS_PER_PROCESS = 8

JWT_SECRET = "e2e-jwt-secret-" + "k3" * 20
MASTER_KEY = "5a" * 32


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


class HoldingTelegramPeer(TelegramPeer):
    """The Telegram peer, which can also hold each sendMessage for `hold` seconds once it has arrived: a provider
    slow enough for a test to kill the worker while it is inside the call. `sends_started` counts every
    sendMessage that arrived, answered or not; `entered` is set by the first."""

    def __init__(self, **credentials: str) -> None:
        super().__init__(**credentials)
        self.hold = 0.0
        self.sends_started = 0
        self.entered = threading.Event()

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.hold = 0.0
            self.sends_started = 0
            self.entered.clear()

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        if path.endswith("/sendMessage"):
            with self.lock:
                self.sends_started += 1
            self.entered.set()
            time.sleep(self.hold)
        return super().answer(method, path, headers, body)


@dataclass
class E2EPeers:
    smtp: SmtpPeer
    twilio: TwilioPeer
    whatsapp: WhatsAppPeer
    telegram: HoldingTelegramPeer

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
        telegram=HoldingTelegramPeer(bot_token=TELEGRAM_TOKEN).start(),
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
        self.port = int(self.env["PORT"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.http = self.session()

    @property
    def instance(self) -> Path:
        return Path(self.env["INSTANCE_PATH"])

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
        """SIGTERM to the whole group, as a platform stops a dyno, and SIGKILL to what is left after `grace`.
        The group, not `sh`: `sh -c` dies at once, while the program it started shuts down in its own time."""
        popen = self.processes.pop(process, None)
        if popen is None:
            return
        _signal_group(popen.pid, signal.SIGTERM)
        if not _group_exited(popen.pid, grace):
            _signal_group(popen.pid, signal.SIGKILL)
        self._wait_gone(process, popen)

    def kill(self, process: str) -> None:
        """SIGKILL the process's whole group at once: no shutdown, no goodbye to the broker or the database."""
        popen = self.processes.pop(process)
        _signal_group(popen.pid, signal.SIGKILL)
        self._wait_gone(process, popen)

    def _wait_gone(self, process: str, popen: subprocess.Popen, seconds: float = 10) -> None:
        """Until every thread of the group is gone and, for a worker on Redis, until Redis has let go of every
        consumer blocked on the stack's db: a BRPOP a dead worker left pending would take the next job published."""
        popen.wait(timeout=seconds)
        assert _group_exited(popen.pid, seconds), f"process group {popen.pid} still running {seconds:g} s after SIGKILL"
        if process != "worker" or not self.uses_redis:
            return
        deadline = time.monotonic() + seconds
        client = redis.Redis.from_url(self.env["REDIS_URL"])
        db = client.connection_pool.connection_kwargs.get("db", 0)
        # The web's readiness check also waits on a reply queue for up to a second; that one ends by itself.
        while blocked := [c for c in client.client_list() if int(c["db"]) == db and "b" in c["flags"]]:
            assert time.monotonic() < deadline, f"Redis still has consumers blocked on db {db}: {blocked}"
            time.sleep(0.02)
        client.close()

    def stop_all(self) -> None:
        for process in list(self.processes):
            self.stop(process)

    def output(self, *processes: str) -> str:
        parts = []
        for process in processes or PROCESSES:
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
        session = kwargs.pop("session", None) or self.http
        return session.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)

    def create(self, host: Host, kind: str, config: dict[str, Any], name: str | None = None, **fields: Any) -> dict:
        body = {"type": kind, "name": name or f"{kind} connector", "config": config, **fields}
        response = self.request("POST", "/api/connectors", host, json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def listed(self, host: Host) -> list[dict[str, Any]]:
        response = self.request("GET", "/api/connectors", host)
        assert response.status_code == 200, response.text
        return response.json()["connectors"]

    def send_test(
        self, host: Host, connector_id: str, destination: str, session: requests.Session | None = None
    ) -> requests.Response:
        return self.request(
            "POST",
            f"/api/connectors/{connector_id}/test",
            host,
            json={"test_destination": destination},
            session=session,
        )

    def set_will(self, host_id: uuid.UUID, active: bool, headers: dict[str, str]) -> requests.Response:
        return self.request("PUT", f"/api/internal/hosts/{host_id}/will", json={"active": active}, headers=headers)

    def session(self) -> requests.Session:
        """A client of its own (its own connections), for requests made from other threads.

        An idempotent request whose connection breaks under it is retried, twice at most, as HTTP clients may
        (RFC 9110, 9.2.2); urllib3 logs each retry. A kept-alive connection the web closes as the next request
        arrives is reset (gunicorn closes idle ones after its keep-alive): seen once, a GET after a 5 s pause,
        with two suites sharing this machine's two cores.
        """
        session = requests.Session()
        session.trust_env = False  # no proxy: loopback only
        # Broken connections only: an answer, whatever its status and Retry-After, is the test's to read.
        retry = Retry(
            total=2,
            connect=2,
            read=2,
            status=0,
            other=0,
            redirect=False,
            respect_retry_after_header=False,
            raise_on_status=False,
        )
        session.mount("http://", HTTPAdapter(max_retries=retry))
        return session


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a thread of the group is still running, not only `sh` (zombies aside: a container's PID 1 may
    never reap). Threads count: a leader that has exited is a zombie while its other threads are still being
    torn down, and those still hold the process's sockets open."""
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            tasks = list((process / "task").iterdir())
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            try:
                state, _ppid, pgrp = (task / "stat").read_text().rpartition(")")[2].split()[:3]
            except (OSError, ValueError):
                continue
            if int(pgrp) == pgid and state not in ("Z", "X"):
                return True
    return False


def _group_exited(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def base_env(instance: Path, providers: E2EPeers) -> dict[str, str]:
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.defpath]),
        "PORT": str(free_port()),
        "JWT_SECRET_KEY": JWT_SECRET,
        "MASTER_KEY": MASTER_KEY,
        "ALLOW_PRIVATE_DESTINATIONS": "true",
        "TEST_DELIVERY_TIMEOUT": str(TEST_DELIVERY_TIMEOUT),
        "PROVIDER_TIMEOUT": str(PROVIDER_TIMEOUT),
        "TEST_WAITS_PER_PROCESS": str(TEST_WAITS_PER_PROCESS),
        # Dispatch at test speed: beat sweeps twice a second, rounds come back within a second.
        "SWEEP_INTERVAL": str(SWEEP_INTERVAL),
        "DISPATCH_RETRY_BASE": "0.2",
        "DISPATCH_RETRY_MAX": "1",
        # No periodic credential check of a connector during a run (its first one falls at random within this):
        # a check would send to the peers and hold the connector's one in-flight probe.
        "CONNECTOR_CHECK_INTERVAL": str(365 * 86400),
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
    env = {**base_env(instance, e2e_peers), **getattr(request.module, "STACK_ENV", {})}

    db_name = None
    if kind == "postgres_redis":
        db_name = f"connectors_e2e_{uuid.uuid4().hex[:10]}"
        admin = _admin_engine(TEST_DATABASE_URL)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        admin.dispose()
        env["DATABASE_URL"] = f"{TEST_DATABASE_URL.rpartition('/')[0]}/{db_name}"
        env["REDIS_URL"] = shifted_redis_url(TEST_REDIS_URL, E2E_REDIS_DB_OFFSET)

    started = Stack(kind, env, logs, uses_redis=kind == "postgres_redis")
    try:
        if started.uses_redis:
            redis.Redis.from_url(env["REDIS_URL"]).flushdb()
        started.release()
        for process in ("web", "worker", "beat"):
            started.start(process)
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


@contextlib.contextmanager
def worker_stopped(stack: Stack) -> Iterator[None]:
    """Stop the worker process; start it again afterwards and wait until the stack is ready."""
    stack.stop("worker")
    try:
        yield
    finally:
        stack.start("worker")
        stack.wait_ready()
