"""The deployment files agree with each other, with the README and with the code.

The Procfile is the source of truth for the process types; docker-compose.yml and the Dockerfile must run the
same commands, and every setting they pass must be one the README documents and the code reads.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("migrate", "web", "worker", "beat")
LONG_RUNNING = ("web", "worker", "beat")
COMPOSE_FOR_PROCFILE = {"migrate": "release", "web": "web", "worker": "worker", "beat": "beat"}
# Read by gunicorn.conf.py, the Procfile's command lines or Python itself rather than by app/.
NOT_READ_BY_APP = {"PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS", "WORKER_CONCURRENCY", "SSL_CERT_FILE"}
SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def procfile_lines() -> list[tuple[str, str]]:
    lines = []
    for line in (ROOT / "Procfile").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, separator, command = line.partition(":")
        assert separator, f"not a Procfile line: {line!r}"
        lines.append((name.strip(), command.strip()))
    return lines


def procfile() -> dict[str, str]:
    return dict(procfile_lines())


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def normalise(command: str | list[str]) -> str:
    """A compose or Dockerfile command as the shell line it runs: `$$` unescaped, an `sh -c` wrapper removed."""
    words = command if isinstance(command, list) else shlex.split(command.replace("$$", "$"))
    words = [word.replace("$$", "$") for word in words]
    if len(words) == 3 and words[0] in {"sh", "/bin/sh"} and words[1] == "-c":
        words = shlex.split(words[2])
    return " ".join(words)


def settings_table() -> dict[str, str]:
    """The README's `## Settings` table: variable name -> its row."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("## Settings")
    rows: dict[str, str] = {}
    in_table = False
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            in_table = True
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            name = cells[0].strip("`")
            if name in {"variable", ""} or set(name) <= set("-: "):
                continue
            rows[name] = line
        elif in_table:
            break
    return rows


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def option(words: list[str], *names: str) -> str:
    for index, word in enumerate(words):
        for name in names:
            if word == name:
                return words[index + 1]
            if word.startswith(name + "="):
                return word.partition("=")[2]
    raise AssertionError(f"none of {names} in {words}")


def app_sources() -> str:
    return "\n".join(path.read_text() for path in sorted((ROOT / "app").rglob("*.py")))


# --- Procfile ---------------------------------------------------------------------------------------------


def test_procfile_declares_release_web_worker_and_beat_once_each():
    names = [name for name, _ in procfile_lines()]
    assert sorted(names) == ["beat", "release", "web", "worker"]
    assert len(names) == len(set(names))


def test_release_runs_the_migrations():
    assert shlex.split(procfile()["release"]) == ["flask", "--app", "wsgi", "db", "upgrade"]


def test_web_runs_gunicorn_with_its_config_file_on_every_interface_at_port(monkeypatch):
    assert shlex.split(procfile()["web"]) == ["gunicorn", "wsgi:app"]
    import runpy

    monkeypatch.setenv("PORT", "6123")
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    embedded = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert embedded["bind"] == "0.0.0.0:6123" and embedded["worker_class"] == "gthread"
    assert embedded["workers"] == 1, "in-memory limits hold only in one process"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert runpy.run_path(str(ROOT / "gunicorn.conf.py"))["workers"] == 2
    assert callable(embedded["on_starting"])


def test_worker_consumes_every_queue_the_app_declares():
    from app.channels import TYPE_NAMES
    from app.queues import DISPATCH_QUEUE, OTP_QUEUE, queue_names

    words = shlex.split(procfile()["worker"])
    assert words[:5] == ["celery", "-A", "celery_app", "--quiet", "worker"]
    # Without -Q a worker consumes every queue of task_queues: a new connector type needs no edit here.
    assert "-Q" not in words and "--queues" not in words
    assert sorted(queue_names()) == sorted([*TYPE_NAMES, DISPATCH_QUEUE, OTP_QUEUE])


def test_each_queue_has_its_own_exchange(app):
    queues = app.extensions["celery"].conf.task_queues
    assert {queue.name: queue.exchange.name for queue in queues} == {queue.name: queue.name for queue in queues}


def test_beat_runs_the_periodic_work():
    assert shlex.split(procfile()["beat"])[:5] == ["celery", "-A", "celery_app", "--quiet", "beat"]


@pytest.mark.parametrize("process", ["worker", "beat"])
def test_celery_prints_no_plain_text_banner(process):
    # The banner is printed, not logged: --quiet (an option of `celery` itself, before the command) drops it.
    words = shlex.split(procfile()[process])
    assert words.index("--quiet") < words.index(process)


# --- docker-compose.yml -----------------------------------------------------------------------------------


def test_compose_has_the_database_the_broker_and_the_processes():
    assert {"postgres", "redis", "migrate", "web", "worker", "beat"} <= set(compose()["services"])


@pytest.mark.parametrize("service", [*LONG_RUNNING, "postgres", "redis"])
def test_every_long_running_service_comes_back_when_it_dies(service):
    assert compose()["services"][service].get("restart") in {"unless-stopped", "always"}


def test_compose_redis_keeps_its_data_across_restarts():
    redis_service = compose()["services"]["redis"]
    command = normalise(redis_service["command"])
    assert "--appendonly yes" in command
    assert any(volume.endswith(":/data") for volume in redis_service["volumes"])


@pytest.mark.parametrize("service", APP_SERVICES)
def test_compose_runs_the_procfile_command(service):
    command = compose()["services"][service]["command"]
    assert normalise(command) == normalise(procfile()[COMPOSE_FOR_PROCFILE[service]])


def test_dockerfile_default_command_is_the_procfile_web_line():
    text = (ROOT / "Dockerfile").read_text()
    cmd = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert len(cmd) == 1
    assert normalise(json.loads(cmd[0].removeprefix("CMD "))) == normalise(procfile()["web"])


@pytest.mark.parametrize("service", LONG_RUNNING)
def test_web_and_worker_start_only_after_the_migrations_succeeded(service):
    depends = compose()["services"][service]["depends_on"]
    assert isinstance(depends, dict), "depends_on needs conditions, not a bare list"
    assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_migrations_wait_for_a_healthy_postgres():
    services = compose()["services"]
    depends = services["migrate"]["depends_on"]
    assert isinstance(depends, dict) and depends["postgres"]["condition"] == "service_healthy"
    assert services["postgres"].get("healthcheck"), "service_healthy needs a healthcheck"
    assert services["migrate"].get("restart", "no") == "no"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_process_gets_the_compose_postgres_and_redis(service):
    env = environment(compose()["services"][service])
    database, broker = urlsplit(env.get("DATABASE_URL", "")), urlsplit(env.get("REDIS_URL", ""))
    assert database.scheme in {"postgresql", "postgres"} and database.hostname == "postgres"
    assert broker.scheme in {"redis", "rediss"} and broker.hostname == "redis"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_variable_compose_gives_the_app_is_a_documented_setting(service):
    spec = compose()["services"][service]
    command = spec.get("command", "")
    command_text = " ".join(command) if isinstance(command, list) else command
    used = set(environment(spec)) | set(SHELL_VARIABLE.findall(command_text.replace("$$", "$")))
    assert used, f"{service} passes no variable at all"
    undocumented = sorted(used - set(settings_table()) - {"PORT"})
    assert undocumented == [], f"{service} uses variables the README's settings table does not list"


# --- README settings ----------------------------------------------------------------------------------------


def test_the_settings_table_lists_the_core_settings():
    documented = settings_table()
    assert {"DATABASE_URL", "REDIS_URL", "JWT_SECRET_KEY", "MASTER_KEY", "LOG_LEVEL", "INSTANCE_PATH"} <= set(
        documented
    )


def test_every_documented_setting_is_read_by_the_app_or_the_procfile():
    sources = app_sources()
    procfile_text = (ROOT / "Procfile").read_text()
    sources += (ROOT / "gunicorn.conf.py").read_text()
    unread = []
    for name in settings_table():
        if name in NOT_READ_BY_APP:
            continue
        if not re.search(rf"[\"']{re.escape(name)}[\"']", sources):
            unread.append(name)
    assert unread == [], "documented settings that nothing in app/ reads"
    assert re.search(r"\$\{?WORKER_CONCURRENCY\b", procfile_text), "the Procfile does not read WORKER_CONCURRENCY"
    gunicorn_conf = (ROOT / "gunicorn.conf.py").read_text()
    for name in ("PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS"):
        assert re.search(rf"[\"']{name}[\"']", gunicorn_conf), f"gunicorn.conf.py does not read {name}"
