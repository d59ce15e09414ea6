"""The laptop tools: `flask keys`, the provider sink, and the README's "Use it" commands run in order.

The provider sink is driven by the service's own providers (the real Twilio, httpx and python-telegram-bot
clients); the README's commands run with bash against the Procfile's processes under honcho, as a newcomer
runs them, with both sinks started by the README's own commands.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import requests
from sqlalchemy import create_engine, text

from app.channels.base import DeliveryError, OutgoingMessage, ProviderSettings
from app.channels.sms import TwilioSmsProvider
from app.channels.telegram import TelegramProvider
from app.channels.whatsapp import WhatsAppProvider
from app.config import load_settings
from tests.conftest import ROOT, TEST_DATABASE_URL, TEST_REDIS_URL
from tests.e2e_stack import _group_exited, _signal_group
from tests.peers import free_port
from tests.support import E2E_REDIS_DB_OFFSET, shifted_redis_url

BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


# --- the README's blocks --------------------------------------------------------------------------------------


@dataclass
class Block:
    language: str
    text: str
    marker: str | None  # the `<!-- name -->` line right above the fence, if any


def readme_blocks(heading: str) -> list[Block]:
    """The fenced blocks of the README section under `heading`, up to the next heading of any level."""
    lines = README.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("#")), len(lines))
    blocks: list[Block] = []
    marker: str | None = None
    inside: list[str] | None = None
    language = ""
    for line in lines[start:end]:
        if inside is not None:
            if line.startswith("```"):
                blocks.append(Block(language, "\n".join(inside) + "\n", marker))
                inside, marker = None, None
            else:
                inside.append(line)
        elif line.startswith("```"):
            language, inside = line[3:].strip(), []
        elif found := re.fullmatch(r"<!-- ([a-z-]+) -->", line.strip()):
            marker = found.group(1)
        elif line.strip():
            marker = None
    return blocks


def substituted(block_text: str, replacements: dict[str, str], used: set[str]) -> str:
    for old, new in replacements.items():
        if old in block_text:
            used.add(old)
            block_text = block_text.replace(old, new)
    return block_text


# --- flask keys -----------------------------------------------------------------------------------------------


def _keys(app: Any) -> dict[str, str]:
    result = app.test_cli_runner().invoke(args=["keys"])
    assert result.exit_code == 0, result.output
    pairs = [line.partition("=") for line in result.output.splitlines()]
    assert all(sep == "=" for _, sep, _ in pairs), result.output
    return {name: value for name, _, value in pairs}


def test_keys_prints_fresh_env_lines_that_the_settings_accept(app, tmp_path):
    first, second = _keys(app), _keys(app)
    assert list(first) == ["JWT_SECRET_KEY", "MASTER_KEY"]
    assert re.fullmatch(r"[0-9a-f]{64}", first["MASTER_KEY"])
    assert len(first["JWT_SECRET_KEY"]) >= 32 and first["JWT_SECRET_KEY"].isprintable()
    assert first["MASTER_KEY"] != second["MASTER_KEY"] and first["JWT_SECRET_KEY"] != second["JWT_SECRET_KEY"]
    assert first["JWT_SECRET_KEY"] != first["MASTER_KEY"]
    # What production and a shared database demand, with nothing generated.
    env = {**first, "APP_ENV": "production", "DATABASE_URL": "postgresql://connectors@127.0.0.1:5432/connectors"}
    settings = load_settings(env, tmp_path / "instance")
    assert settings["JWT_SECRET_KEY"] == first["JWT_SECRET_KEY"]
    assert settings["MASTER_KEY"] == bytes.fromhex(first["MASTER_KEY"])
    assert not (tmp_path / "instance" / "secrets.json").exists()


# --- the provider sink ----------------------------------------------------------------------------------------


def _wait_listening(port: int, process: subprocess.Popen, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, f"{what} did not start listening"
            time.sleep(0.05)


@dataclass
class Sink:
    base_url: str
    process: subprocess.Popen

    def stop(self) -> str:
        self.process.terminate()
        output, _ = self.process.communicate(timeout=10)
        return output


@contextmanager
def _running_sink(instance: Path) -> Iterator[Sink]:
    """`flask --app wsgi provider-sink` as a newcomer starts it, on a free port."""
    port = free_port()
    env = {**os.environ, "INSTANCE_PATH": str(instance)}
    env.pop("DATABASE_URL", None)
    process = subprocess.Popen(
        [str(BIN / "flask"), "--app", "wsgi", "provider-sink", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        _wait_listening(port, process, "the provider sink")
        yield Sink(f"http://127.0.0.1:{port}", process)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


@pytest.fixture
def provider_sink(tmp_path: Path) -> Iterator[Sink]:
    with _running_sink(tmp_path / "sink") as sink:
        yield sink


@pytest.fixture(scope="module")
def shared_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    with _running_sink(tmp_path_factory.mktemp("sink")) as sink:
        yield sink


SMS = {
    "provider": "twilio",
    "api_key_sid": "SK" + "0123456789abcdef" * 2,
    "api_key_secret": "sink-secret-7e1f0c",
    "account_sid": "AC" + "fedcba9876543210" * 2,
    "from_number": "+15005550006",
}
WHATSAPP = {
    "provider": "whatsapp",
    "access_token": "sink-access-token-4d2a9b",
    "phone_number_id": "100000000000001",
    "business_account_id": "100000000000002",
    "api_version": "v24.0",
}
TELEGRAM = {"provider": "telegram", "bot_token": "123456:sink-bot-token-9c8b7a6d5e4f"}
SINK_SECRETS = (SMS["api_key_secret"], WHATSAPP["access_token"], TELEGRAM["bot_token"], "sink-bot-token-9c8b7a6d5e4f")


def _expect(code: str, call: Any) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        call()
    assert caught.value.code == code, caught.value
    return caught.value


def test_the_provider_sink_takes_sends_and_checks_from_the_real_client_libraries(provider_sink):
    base = provider_sink.base_url
    settings = ProviderSettings(timeout=5, twilio_base_url=base, whatsapp_base_url=base, telegram_base_url=base)
    sms, whatsapp, telegram = TwilioSmsProvider(settings), WhatsAppProvider(settings), TelegramProvider(settings)

    sms.send(SMS, "+14155550199", OutgoingMessage("s", "sms text 1"))
    assert sms.verify(SMS) == {"from_number": "+15005550006", "account": "Provider sink"}
    # An account SID with its auth token (AC as the key) is the other shape Twilio takes.
    as_account = {**SMS, "api_key_sid": SMS["account_sid"]}
    as_account.pop("account_sid")
    sms.send(as_account, "+14155550198", OutgoingMessage("s", "sms text 2"))

    whatsapp.send(WHATSAPP, "+14155550188", OutgoingMessage("s", "whatsapp text"))
    whatsapp.send({**WHATSAPP, "template_name": "hello_world"}, "+14155550187", OutgoingMessage("s", "unused"))
    assert whatsapp.verify(WHATSAPP) == {"display_phone_number": "+1 555-0100", "verified_name": "Provider sink"}
    # A number the token never asked about is listed once the verify has asked about it: any number verifies.
    assert whatsapp.verify({**WHATSAPP, "phone_number_id": "100000000000009"})["verified_name"] == "Provider sink"

    telegram.send(TELEGRAM, "123456789", OutgoingMessage("s", "telegram text"))
    telegram.send(TELEGRAM, "@bapba_channel", OutgoingMessage("s", "channel text"))
    assert telegram.verify(TELEGRAM) == {"username": "@provider_sink_bot"}

    output = provider_sink.stop()
    assert "--- sms from +15005550006 to +14155550199 (Twilio Messages API)\nsms text 1\n" in output
    assert "--- sms from +15005550006 to +14155550198 (Twilio Messages API)\nsms text 2\n" in output
    assert "--- whatsapp from phone number id 100000000000001 to +14155550188 (WhatsApp Cloud API)\n" in output
    assert "\nwhatsapp text\n" in output and "(template hello_world, en_US)" in output
    assert "--- telegram to chat 123456789 (Telegram Bot API)\ntelegram text\n" in output
    assert "--- telegram to chat @bapba_channel (Telegram Bot API)\nchannel text\n" in output
    assert "--- check: Twilio incoming number +15005550006" in output and "--- check: Telegram getMe" in output
    assert "--- check: WhatsApp business account 100000000000002 lists 100000000000001" in output
    assert "TWILIO_API_BASE_URL=" + base in output and "TELEGRAM_API_BASE_URL=" + base in output
    for secret in SINK_SECRETS:
        assert secret not in output


def test_the_provider_sink_refuses_what_the_providers_refuse(provider_sink):
    base = provider_sink.base_url
    settings = ProviderSettings(timeout=5, twilio_base_url=base, whatsapp_base_url=base, telegram_base_url=base)
    sms, telegram = TwilioSmsProvider(settings), TelegramProvider(settings)
    message = OutgoingMessage("s", "never printed")

    # Credentials of the wrong shape.
    _expect("auth_failed", lambda: sms.send({**SMS, "api_key_sid": "SK" + "z" * 32}, "+14155550199", message))
    other_account = {**SMS, "api_key_sid": "AC" + "1" * 32}  # an auth token speaks for its own account only
    _expect("auth_failed", lambda: sms.send(other_account, "+14155550199", message))
    _expect("auth_failed", lambda: telegram.send({**TELEGRAM, "bot_token": "12:short"}, "123456789", message))
    _expect("auth_failed", lambda: telegram.verify({**TELEGRAM, "bot_token": "not-a-token"}))
    # Twilio's magic numbers, as its test credentials answer them.
    refused = _expect("destination_rejected", lambda: sms.send(SMS, "+15005550001", message))
    assert "21211" in str(refused)
    _expect("destination_rejected", lambda: sms.send(SMS, "+15005550009", message))
    _expect("sender_rejected", lambda: sms.send({**SMS, "from_number": "+15005550007"}, "+14155550199", message))
    # Telegram's own refusals.
    _expect("destination_rejected", lambda: telegram.send(TELEGRAM, "not a chat", message))

    output = provider_sink.stop()
    assert "--- sms from +15005550006 to +15005550001 refused: Twilio error 21211" in output
    assert "never printed" not in output
    for secret in SINK_SECRETS:
        assert secret not in output


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status"),
    [
        ("POST", "/v24.0/100000000000001/messages", {"Authorization": "Bearer t"}, b"{not json", 400),
        ("POST", "/v24.0/100000000000001/messages", {"Authorization": "Bearer t"}, b"[1, 2]", 400),
        ("POST", "/v24.0/100000000000001/messages", {}, b"{}", 401),
        ("GET", "/v24.0/100000000000001/subscribed_apps", {"Authorization": "Bearer t"}, b"", 404),
        ("POST", "/2010-04-01/Accounts/AC" + "0" * 32 + "/Messages.json", {}, b"To=%2B14155550199", 401),
        ("POST", "/2010-04-01/Accounts/not-an-account/Messages.json", {}, b"", 404),
        ("POST", "/bot123456:" + "a" * 30 + "/sendMessage", {"Content-Type": "application/json"}, b"nope", 400),
        ("POST", "/bot123456:" + "a" * 30 + "/sendMessage", {}, b"chat_id=1", 400),
        ("POST", "/bot123456:" + "a" * 30 + "/sendMessage", {}, b"chat_id=1&text=%ff%fe", 200),
        ("POST", "/bot123456:" + "a" * 30 + "/getUpdates", {}, b"", 404),
        ("POST", "/bot123456:" + "a" * 30 + "/sendMessage", {}, b"\xff\xfe", 400),
        ("PUT", "/bot123456:" + "a" * 30 + "/sendMessage", {}, b"", 405),
        ("GET", "/anything/else", {}, b"", 404),
        ("POST", "/v24.0/1/messages", {"Content-Length": "12x"}, None, 400),
        ("POST", "/v24.0/1/messages", {"Content-Length": "\u00b2"}, None, 400),
        ("OPTIONS", "/v24.0/1/messages", {}, b"", 405),
        ("POST", "/v24.0/1/messages", {"Content-Length": str(2 * 1024 * 1024)}, None, 413),
    ],
)
def test_the_provider_sink_answers_bad_requests_with_a_4xx(shared_sink, method, path, headers, body, status):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(shared_sink.base_url.rsplit(":", 1)[1]), timeout=5)
    connection.putrequest(method, path)
    for name, value in headers.items():
        connection.putheader(name, value)
    if body is not None:
        connection.putheader("Content-Length", str(len(body)))
    connection.endheaders(body)
    response = connection.getresponse()
    payload = json.loads(response.read())
    assert response.status == status, payload
    assert isinstance(payload, dict)
    assert shared_sink.process.poll() is None


# --- the README's "Use it", in order, against a running service ------------------------------------------------


@dataclass
class Laptop:
    """A clone's folder as the README sees it, with the processes a newcomer starts in other terminals."""

    folder: Path
    env: dict[str, str]
    web_port: int
    mail_port: int
    provider_port: int
    terminals: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def output(self) -> str:
        return "\n".join(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}" for _, log in self.terminals)

    def terminal(self, command: str, name: str) -> tuple[subprocess.Popen, Path]:
        """Start a long-running README command, as in a terminal of its own."""
        log = self.folder.parent / f"{name}-{len(self.terminals)}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                ["bash", "-c", command], cwd=self.folder, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.terminals.append((process, log))
        return process, log

    def wait_ready(self, process: subprocess.Popen, seconds: float = 45) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert process.poll() is None, f"the service exited:\n{self.output()}"
            try:
                if requests.get(f"{self.base_url}/api/health/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"the service was not ready within {seconds:g} s:\n{self.output()}"
            time.sleep(0.2)

    def stop(self, process: subprocess.Popen, log: Path) -> None:
        """Ctrl-C, as a person stops honcho or a sink; whatever honcho started goes too."""
        children = [int(pid) for pid in re.findall(r"started with pid (\d+)", log.read_text(errors="replace"))]
        _signal_group(process.pid, signal.SIGINT)
        for group in (process.pid, *children):
            if not _group_exited(group, 25):
                _signal_group(group, signal.SIGKILL)
                _group_exited(group, 10)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        for process, log in reversed(self.terminals):
            self.stop(process, log)


def _laptop(tmp_path: Path) -> Laptop:
    folder = tmp_path / "clone"
    folder.mkdir()
    # The clone's entry points and the virtual environment; its instance folder and .env are the test's own.
    for name in ("Procfile", "gunicorn.conf.py", "wsgi.py", "celery_app.py"):
        (folder / name).symlink_to(ROOT / name)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    keep = {key: value for key, value in os.environ.items() if key in {"HOME", "LANG", "PGPASSWORD", "SYSTEMROOT"}}
    web_port = free_port()
    env = {
        **keep,
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", os.defpath)]),
        "VIRTUAL_ENV": sys.prefix,
        "INSTANCE_PATH": str(folder / "instance"),  # the README's ./instance, away from the repository's own
        "PORT": str(web_port),  # honcho's base port: the web process's
        "WORKER_CONCURRENCY": "8",
    }
    return Laptop(folder, env, web_port, free_port(), free_port())


@dataclass
class Shell:
    """The shell the README's commands are typed in: variables and functions carry from one block to the next."""

    laptop: Laptop
    names: list[str]
    functions: list[str]

    @property
    def state(self) -> Path:
        return self.laptop.folder.parent / "shell-state.sh"

    def run(self, block: str) -> subprocess.CompletedProcess:
        names, functions = " ".join(self.names), " ".join(self.functions)
        save = f"{{ declare -p {names} 2>/dev/null; declare -f {functions}; }} > {self.state} || true"
        script = f"[ -f {self.state} ] && source {self.state}\n{block}\n{save}\n"
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.laptop.folder, env=self.laptop.env,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    def value(self, name: str) -> str:
        shown = subprocess.run(
            ["bash", "-c", f'source {self.state}; printf %s "${{{name}-}}"'], capture_output=True, text=True, check=True
        )
        return shown.stdout


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


def _wait_for(log: Path, text_: str, seconds: float = 15) -> str:
    deadline = time.monotonic() + seconds
    while text_ not in (content := _read(log)):
        assert time.monotonic() < deadline, f"{text_!r} not in {log.name}:\n{content[-3000:]}"
        time.sleep(0.1)
    return content


def _admin_engine() -> Any:
    return create_engine(
        TEST_DATABASE_URL.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )


@pytest.mark.e2e
@pytest.mark.timeout(240)
@pytest.mark.parametrize("setup", ["embedded", "postgres_redis"])
def test_the_readme_use_it_commands_run_in_order_against_the_running_service(tmp_path, setup):
    if setup == "postgres_redis" and not (TEST_DATABASE_URL and TEST_REDIS_URL):
        pytest.skip("set TEST_DATABASE_URL and TEST_REDIS_URL to follow the README on PostgreSQL and Redis")
    laptop = _laptop(tmp_path)
    replacements = {
        "localhost:5000": f"localhost:{laptop.web_port}",
        '"smtp_port": 8025': f'"smtp_port": {laptop.mail_port}',
        "wsgi mail-sink": f"wsgi mail-sink --port {laptop.mail_port}",
        "wsgi provider-sink": f"wsgi provider-sink --port {laptop.provider_port}",
        "http://127.0.0.1:8026": f"http://127.0.0.1:{laptop.provider_port}",
    }
    used: set[str] = set()
    database = None
    try:
        if setup == "postgres_redis":
            database = f"connectors_readme_{uuid.uuid4().hex[:10]}"
            _follow_the_postgres_recipe(laptop, database)
        else:
            # "Run it" migrated the embedded database before "Use it" begins.
            migrated = subprocess.run(
                ["flask", "--app", "wsgi", "db", "upgrade"], cwd=laptop.folder, env=laptop.env, capture_output=True,
                text=True, timeout=60,
            )  # fmt: skip
            assert migrated.returncode == 0, migrated.stderr

        blocks = [b for b in readme_blocks("## Use it") if b.language == "sh"]
        typed = "\n".join(b.text for b in blocks if b.marker != "own-terminal")
        shell = Shell(
            laptop,
            names=sorted(set(re.findall(r"^\s*([A-Z_][A-Z0-9_]*)=", typed, re.M))),
            functions=re.findall(r"^(\w+)\(\)\s*\{", typed, re.M),
        )
        assert {"TOKEN", "ID", "SMS_ID", "SERVICE_TOKEN", "MID"} <= set(shell.names) and shell.functions == ["id_of"]
        logs: dict[str, Path] = {}
        for block in blocks:
            command = substituted(block.text, replacements, used)
            if block.marker == "own-terminal":
                name = (
                    "mail-sink" if "mail-sink" in command else "provider-sink" if "provider-sink" in command else "web"
                )
                process, logs[name] = laptop.terminal(command, name)
                if name == "web":
                    laptop.wait_ready(process)
                else:
                    _wait_listening(laptop.mail_port if name == "mail-sink" else laptop.provider_port, process, name)
                continue
            finished = shell.run(command)
            assert finished.returncode == 0, (
                f"README block failed:\n{command}\nstdout:\n{finished.stdout}\nstderr:\n{finished.stderr}\n"
                f"{laptop.output()}"
            )
            _check_block(laptop, shell, logs, command, finished.stdout)
        assert used == set(replacements), f"the README no longer has {set(replacements) - used}"

        # Reading an id without jq: a failed request shows its answer and fails, never a KeyError.
        failed = shell.run(
            f'NOPE=$(curl -sS --fail-with-body -X POST "{laptop.base_url}/api/connectors" '
            "-H 'Content-Type: application/json' -d '{}' | id_of)"
        )
        assert failed.returncode != 0
        assert "Missing Authorization Header" in failed.stderr or '"code": 401' in failed.stderr, failed.stderr
        assert "KeyError" not in failed.stderr and "Traceback" not in failed.stderr

        _try_every_sink_config(laptop, shell, logs)
    finally:
        laptop.stop_all()
        if database:
            admin = _admin_engine()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            admin.dispose()
            redis.Redis.from_url(shifted_redis_url(TEST_REDIS_URL, E2E_REDIS_DB_OFFSET)).flushdb()


def _follow_the_postgres_recipe(laptop: Laptop, database: str) -> None:
    """ "On a local PostgreSQL and Redis": its one block, with this run's database and Redis db; the service it
    starts is stopped once ready, as "Use it" stops it to start it again with the sinks."""
    server = urlsplit(TEST_DATABASE_URL)
    redis_url = shifted_redis_url(TEST_REDIS_URL, E2E_REDIS_DB_OFFSET)
    redis.Redis.from_url(redis_url).flushdb()
    createdb = f"createdb -h {server.hostname} -p {server.port or 5432} -U {server.username or 'postgres'}"
    local = {
        "postgresql://postgres@127.0.0.1:5432/connectors": f"{TEST_DATABASE_URL.rpartition('/')[0]}/{database}",
        "redis://127.0.0.1:6379/0": redis_url,
        "createdb -h 127.0.0.1 -U postgres connectors": f"{createdb} {database}",
    }
    [recipe] = [b for b in readme_blocks("### On a local PostgreSQL and Redis") if b.marker == "postgres-redis"]
    used: set[str] = set()
    process, log = laptop.terminal(substituted(recipe.text, local, used), "postgres-redis")
    assert used == set(local), f"the README's recipe no longer has {set(local) - used}"
    laptop.wait_ready(process)
    laptop.stop(process, log)
    laptop.terminals.remove((process, log))


def _check_block(laptop: Laptop, shell: Shell, logs: dict[str, Path], command: str, stdout: str) -> None:
    """What each README block promises, checked once it has run."""
    if "wsgi token 6f1c" in command:
        assert shell.value("TOKEN").count(".") == 2
    if '"type": "email"' in command:
        uuid.UUID(shell.value("ID"))
    if '/test"' in command and "$ID/" in command:
        assert json.loads(stdout.splitlines()[0])["success"] is True
        assert json.loads(stdout.splitlines()[1])["success"] is True  # the verify
        _wait_for(logs["mail-sink"], "--- mail from dev@example.com to me@example.com")
    if '"type": "sms"' in command:
        uuid.UUID(shell.value("SMS_ID"))
        assert json.loads(stdout)["success"] is True
        _wait_for(logs["provider-sink"], "--- sms from +15005550006 to +14155550199 (Twilio Messages API)")
    if "/api/internal/messages/$MID" in command:
        message_id = shell.value("MID")
        will, shown, events = (json.loads(line) for line in stdout.splitlines())
        assert will["will_active"] is True and shown["id"] == message_id and events["events"]
        headers = {"Authorization": f"Bearer {shell.value('SERVICE_TOKEN')}"}
        deadline = time.monotonic() + 20
        while (message := requests.get(f"{laptop.base_url}/api/internal/messages/{message_id}", headers=headers,
                                       timeout=5).json())["status"] in ("queued", "sending", "retrying"):  # fmt: skip
            assert time.monotonic() < deadline, message
            time.sleep(0.2)
        # Fallback: the SMS connector refused the number, the email connector delivered.
        assert message["status"] == "delivered", message
        assert message["delivered_via"] == {"connector_id": shell.value("ID"), "type": "email"}
        assert [(a["type"], a["status"], a["error_code"]) for a in message["attempts"]] == [
            ("sms", "failed", "destination_rejected"),
            ("email", "sent", None),
        ], message["attempts"]
        _wait_for(logs["provider-sink"], "--- sms from +15005550006 to +15005550001 refused: Twilio error 21211")
        assert "Your code is 482913." in _wait_for(logs["mail-sink"], "Your code is 482913.")
    if "-X DELETE" in command:
        headers = {"Authorization": f"Bearer {shell.value('TOKEN')}"}
        left = requests.get(f"{laptop.base_url}/api/connectors", headers=headers, timeout=5).json()["connectors"]
        assert [each["id"] for each in left] == [shell.value("ID")]


def _try_every_sink_config(laptop: Laptop, shell: Shell, logs: dict[str, Path]) -> None:
    """ "Connector configs": each line of the sink configs creates a connector that tests and verifies."""
    [configs] = [b for b in readme_blocks("### Connector configs") if b.marker == "sink-configs"]
    bodies = [json.loads(line.replace('"smtp_port": 8025', f'"smtp_port": {laptop.mail_port}'))
              for line in configs.text.splitlines() if line.strip()]  # fmt: skip
    assert [body["type"] for body in bodies] == ["email", "sms", "whatsapp", "telegram"]
    headers = {"Authorization": f"Bearer {shell.value('TOKEN')}"}
    destinations = {
        "email": "me@example.com",
        "sms": "+14155550199",
        "whatsapp": "+14155550199",
        "telegram": "123456789",
    }
    for body in bodies[1:]:  # email went through "Use it" already
        created = requests.post(f"{laptop.base_url}/api/connectors", json=body, headers=headers, timeout=5)
        assert created.status_code == 201, created.text
        connector = created.json()["id"]
        tested = requests.post(
            f"{laptop.base_url}/api/connectors/{connector}/test",
            json={"test_destination": destinations[body["type"]]}, headers=headers, timeout=30,
        )  # fmt: skip
        assert tested.status_code == 200, tested.text
        verified = requests.post(f"{laptop.base_url}/api/connectors/{connector}/verify", headers=headers, timeout=30)
        assert verified.status_code == 200 and verified.json()["success"] is True, verified.text
    printed = _read(logs["provider-sink"])
    assert "--- whatsapp from phone number id 100000000000001 to +14155550199 (WhatsApp Cloud API)" in printed
    assert "--- telegram to chat 123456789 (Telegram Bot API)" in printed
    assert "--- check: WhatsApp business account 100000000000002 lists 100000000000001" in printed
    for secret in ("any-secret", "any-access-token", "ABC-DEF1234ghIkl-zyx57W2v1u123ew11"):
        assert secret not in printed
