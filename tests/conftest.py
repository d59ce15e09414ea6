"""A fresh app and database per run, a clean database per test, token helpers, loopback peers and a worker.

By default the suite runs on the embedded defaults: SQLite, the filesystem broker with an in-process worker,
and fakeredis behind the rate limiter. With TEST_DATABASE_URL (PostgreSQL) and TEST_REDIS_URL set, the same
tests run on a fresh PostgreSQL database, with Redis as broker, result backend and limiter storage, and a
`celery worker` subprocess.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import jwt as pyjwt
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

from tests.peers import SmtpPeer, TelegramPeer, TwilioPeer, WebhookReceiver, WhatsAppPeer, self_signed_certificate

ROOT = Path(__file__).resolve().parent.parent
TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "").strip()
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "").strip()

JWT_SECRET = "test-jwt-secret-" + "j" * 48  # 64 bytes: long enough for every HMAC size
MASTER_KEY = "11" * 32

# One unique value per secret field, so a leak anywhere can be found by plain search.
SMTP_USER, SMTP_PASSWORD = "mailer", "smtp-pw-5f0c2e91d7"
TWILIO_KEY_SID, TWILIO_SECRET = "SK" + "a" * 32, "twilio-secret-8d41c7aa20"
TWILIO_ACCOUNT_SID = "AC" + "b" * 32
WHATSAPP_TOKEN, WHATSAPP_PHONE_ID = "EAAwa-token-c93b1e6f42", "106540352242922"
TELEGRAM_TOKEN = "7012345678:AAHtgSecretToken4b2d9e8f1a3c5d7e"
SECRET_VALUES = (SMTP_PASSWORD, TWILIO_SECRET, WHATSAPP_TOKEN, TELEGRAM_TOKEN, TELEGRAM_TOKEN.partition(":")[2])

USES_REDIS = bool(TEST_REDIS_URL)
PUBLIC_BASE_URL = "http://connectors.test"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"bapba-test-webhook-secret-32bytes!").decode()


@dataclass
class Peers:
    smtp: SmtpPeer
    smtp_tls: SmtpPeer
    twilio: TwilioPeer
    whatsapp: WhatsAppPeer
    telegram: TelegramPeer
    events: WebhookReceiver

    def all(self) -> list[Any]:
        return [self.smtp, self.smtp_tls, self.twilio, self.whatsapp, self.telegram, self.events]


@pytest.fixture(scope="session")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    import ssl

    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    started = Peers(
        smtp=SmtpPeer(SMTP_USER, SMTP_PASSWORD).start(),
        smtp_tls=SmtpPeer(SMTP_USER, SMTP_PASSWORD, tls_context=tls).start(),
        twilio=TwilioPeer(
            api_key_sid=TWILIO_KEY_SID, api_key_secret=TWILIO_SECRET, account_sid=TWILIO_ACCOUNT_SID
        ).start(),
        whatsapp=WhatsAppPeer(access_token=WHATSAPP_TOKEN, phone_number_id=WHATSAPP_PHONE_ID).start(),
        telegram=TelegramPeer(bot_token=TELEGRAM_TOKEN).start(),
        events=WebhookReceiver(WEBHOOK_SECRET).start(),
    )
    started.cert_file = cert  # type: ignore[attr-defined]
    yield started
    for peer in started.all():
        peer.stop()


def _fresh_postgres_database(url: str) -> tuple[str, str]:
    """Create a database for this run next to the one in `url`; returns (its url, its name)."""
    name = f"connectors_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}", name


@pytest.fixture(scope="session")
def service_env(tmp_path_factory: pytest.TempPathFactory, peers: Peers) -> Iterator[dict[str, str]]:
    instance = tmp_path_factory.mktemp("instance")
    env = {
        "APP_ENV": "test",
        "INSTANCE_PATH": str(instance),
        "JWT_SECRET_KEY": JWT_SECRET,
        "MASTER_KEY": MASTER_KEY,
        "ALLOW_PRIVATE_DESTINATIONS": "true",
        "TEST_DELIVERY_TIMEOUT": "5",
        "PROVIDER_TIMEOUT": "2",
        # Dispatch rounds a second or so apart, so that retries and expiry fit in a test.
        "DISPATCH_RETRY_BASE": "0.3",
        "DISPATCH_RETRY_MAX": "1",
        # Re-checks every few seconds when a test asks the scheduler, as beat would; events to the receiver.
        "CONNECTOR_CHECK_INTERVAL": "2",
        "EVENTS_WEBHOOK_URL": f"{peers.events.base_url}/bapba/events",
        "EVENTS_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "EVENTS_RETRY_BASE": "0.2",
        "LOG_LEVEL": "DEBUG",
        "TWILIO_API_BASE_URL": peers.twilio.base_url,
        "WHATSAPP_API_BASE_URL": peers.whatsapp.base_url,
        "TELEGRAM_API_BASE_URL": peers.telegram.base_url,
        "SSL_CERT_FILE": str(peers.cert_file),  # type: ignore[attr-defined]
        # Where providers would post their receipts: the tests post them themselves, signed for this address.
        "PUBLIC_BASE_URL": PUBLIC_BASE_URL,
    }
    db_name = None
    if TEST_DATABASE_URL:
        env["DATABASE_URL"], db_name = _fresh_postgres_database(TEST_DATABASE_URL)
    if TEST_REDIS_URL:
        env["REDIS_URL"] = TEST_REDIS_URL
        redis.Redis.from_url(TEST_REDIS_URL).flushdb()
    saved = dict(os.environ)
    os.environ.update(env)
    yield env
    os.environ.clear()
    os.environ.update(saved)
    if db_name:
        admin = create_engine(
            TEST_DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def fake_redis_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture(scope="session")
def app(service_env: dict[str, str], fake_redis_server: fakeredis.FakeServer) -> Iterator[Flask]:
    from flask_migrate import upgrade

    from app import create_app
    from app.extensions import init_migrations

    overrides: dict[str, Any] = {}
    if not USES_REDIS:
        pool = redis.ConnectionPool(server=fake_redis_server, connection_class=fakeredis.FakeRedisConnection)
        overrides.update(RATELIMIT_STORAGE_URI="redis://fakeredis", RATELIMIT_STORAGE_OPTIONS={"connection_pool": pool})
    flask_app = create_app(overrides, env=service_env)
    flask_app.config["TESTING"] = True
    init_migrations(flask_app)
    with flask_app.app_context():
        upgrade(directory=str(ROOT / "migrations"))
    yield flask_app


def _start_worker_subprocess(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "celery", "-A", "celery_app", "worker",
        "--pool", "threads", "--concurrency", "8",
        "--without-heartbeat", "--without-mingle", "--without-gossip", "--loglevel", "DEBUG",
    ]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def worker(app: Flask, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Celery worker consuming every provider queue, for the whole run."""
    celery = app.extensions["celery"]
    if USES_REDIS:
        log_path = tmp_path_factory.mktemp("worker") / "worker.log"
        process = _start_worker_subprocess(service_env, log_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"celery worker exited: {log_path.read_text()[-3000:]}")
            if celery.control.ping(timeout=0.5):
                break
        else:
            raise RuntimeError("celery worker did not answer a ping within 60 s")
        process.log_path = log_path  # type: ignore[attr-defined]
        yield process
        process.terminate()
        process.wait(timeout=30)
        return

    from celery.contrib.testing.worker import start_worker

    import worker.tasks  # noqa: F401 - the worker's tasks, which the web never loads

    with start_worker(
        celery, pool="threads", concurrency=8, perform_ping_check=False, loglevel="WARNING", shutdown_timeout=30
    ) as in_process:
        yield in_process


@pytest.fixture(autouse=True)
def clean_state(request: pytest.FixtureRequest) -> Iterator[None]:
    # The limiter is one object bound to the last app built; tests that build other apps must not keep it.
    from app.extensions import limiter

    limiter_state = vars(limiter).copy()
    yield
    vars(limiter).clear()
    vars(limiter).update(limiter_state)
    if "app" not in request.fixturenames:
        return
    flask_app: Flask = request.getfixturevalue("app")
    from sqlalchemy.exc import OperationalError

    from app.extensions import db, limiter

    with flask_app.app_context():
        for attempt in range(5):
            db.session.rollback()
            try:
                for table in ("delivery_attempts", "messages", "events", "connectors", "hosts"):
                    db.session.execute(text(f"DELETE FROM {table}"))
                db.session.commit()
                break
            except OperationalError:  # a worker still finishing the test's last job held a row (a deadlock)
                db.session.rollback()
                if attempt == 4:
                    raise
                time.sleep(0.2)
        limiter.reset()
    if "peers" in request.fixturenames:
        for peer in request.getfixturevalue("peers").all():
            peer.reset()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def make_token(subject: str | None = None, *, expires_in: int = 600, secret: str = JWT_SECRET, **claims: Any) -> str:
    """A token as the BAP auth service issues it: sub, iat and exp only, unless told otherwise."""
    now = int(time.time())
    payload: dict[str, Any] = {"iat": now, "exp": now + expires_in, **claims}
    if subject is not None:
        payload["sub"] = subject
    return pyjwt.encode(payload, secret, algorithm="HS256")


@dataclass
class Host:
    id: uuid.UUID
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def new_host() -> Host:
    host_id = uuid.uuid4()
    return Host(host_id, make_token(str(host_id)))


@pytest.fixture
def host() -> Host:
    return new_host()


@pytest.fixture
def other_host() -> Host:
    return new_host()


def service_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token('will-service', role='service')}"}


def config_for(kind: str, peers: Peers | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid config of each type; with `peers`, one that reaches the loopback peer."""
    smtp_port = peers.smtp.port if peers else 587
    configs: dict[str, dict[str, Any]] = {
        "email": {
            "smtp_host": "127.0.0.1" if peers else "smtp.example.com",
            "smtp_port": smtp_port,
            "username": SMTP_USER,
            "password": SMTP_PASSWORD,
            "from_address": "noreply@bapba.example",
            **({"security": "none"} if peers else {}),
        },
        "sms": {
            "provider": "twilio",
            "api_key_sid": TWILIO_KEY_SID,
            "api_key_secret": TWILIO_SECRET,
            "account_sid": TWILIO_ACCOUNT_SID,
            "from_number": "+14155550100",
        },
        "whatsapp": {
            "provider": "whatsapp",
            "access_token": WHATSAPP_TOKEN,
            "phone_number_id": WHATSAPP_PHONE_ID,
            "business_account_id": "987654321098765",
        },
        "telegram": {"provider": "telegram", "bot_token": TELEGRAM_TOKEN},
    }
    return {**configs[kind], **overrides}


def create_connector(
    client: FlaskClient, host: Host, kind: str, name: str | None = None, peers: Peers | None = None, **fields: Any
) -> dict[str, Any]:
    body = {"type": kind, "name": name or f"{kind} connector", "config": config_for(kind, peers), **fields}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()
