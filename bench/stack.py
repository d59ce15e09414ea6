"""The processes a benchmark runs against: a fresh database, the Procfile's release, web and worker, and helpers.

Every process starts in its own process group, so stopping it also stops what it forked (gunicorn's workers).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx
import psycopg
import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("BENCH_REDIS_DB", "5"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pythonpath_with_root(env: dict[str, str]) -> str:
    """PYTHONPATH with this checkout first, for processes that run a module of bench/ (the floors)."""
    return os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))


def procfile(source: Path) -> dict[str, str]:
    """The Procfile's commands by process name."""
    entries: dict[str, str] = {}
    for line in (source / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not line.lstrip().startswith("#"):
            entries[name.strip()] = command.strip()
    return entries


def celery_config(env: dict[str, str], instance: Path, *, results: bool = True) -> dict[str, object]:
    """The Celery settings the service's processes derive from `env`, read through the app's own settings
    loader (so that a setting added there, such as SWEEP_INTERVAL, is never missing here)."""
    from app.config import load_settings
    from app.queues import celery_settings

    config = celery_settings(load_settings(env, instance), instance)
    if not results:
        config["result_backend"] = None
    return config


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces; the parent pid is the second field after it.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    result, queue = [], [pid]
    while queue:
        children = _children(queue.pop())
        result.extend(children)
        queue.extend(children)
    return result


def memory_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, in KiB, from /proc."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


class Process:
    """A shell command started in a new session; `stop` ends its whole process group."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        return [self.pid, *descendants(self.pid)] if self.alive() else []

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace: float = 20.0) -> None:
        group = self.popen.pid
        if self.alive():
            _signal_group(group, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(group, signal.SIGKILL)
                self.popen.wait(10)
        # A forked child can outlive the shell that started it; nothing of the group may stay behind.
        deadline = time.monotonic() + grace
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(group):
            _signal_group(group, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(check: Callable[[], bool], *, seconds: float, what: str, process: Process | None = None) -> None:
    """Poll `check()` until it is true; fail naming `what`, with the process's log when it died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{process.name} exited while waiting for {what}:\n{process.log_tail()}")
        try:
            if check():
                return
        except Exception:  # noqa: S110 - not up yet
            pass
        time.sleep(0.2)
    tail = f":\n{process.log_tail()}" if process is not None else ""
    raise RuntimeError(f"timed out after {seconds:g} s waiting for {what}{tail}")


def start_peer(kind: str, log_dir: Path, *extra: str) -> tuple[Process, int]:
    """A peer of `bench/peers.py` in its own process, listening; and its port."""
    peer = Process(f"peer-{kind}", [sys.executable, "-m", "bench.peers", kind, *extra], dict(os.environ), ROOT, log_dir)
    wait_until(lambda: b"READY " in peer.log_path.read_bytes(), seconds=30, what=f"the {kind} peer", process=peer)
    port = int(peer.log_path.read_text().split("READY ", 1)[1].split()[0])
    return peer, port


class Database:
    """A PostgreSQL database created for this run and dropped at the end."""

    def __init__(self) -> None:
        self.name = f"connectors_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
        self.url = f"{base}/{self.name}"

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url)

    def drop(self) -> None:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class Stack:
    """The service as the Procfile runs it, on PostgreSQL and Redis or on the embedded defaults."""

    def __init__(
        self,
        name: str,
        *,
        embedded: bool,
        log_dir: Path,
        extra_env: dict[str, str],
        source: Path,
        redis_db: int = REDIS_DB,
    ) -> None:
        self.name = name
        self.source = source
        self.log_dir = log_dir / name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.instance = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        self.jwt_secret = secrets.token_hex(32)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.commands = procfile(source)
        self.database: Database | None = None
        self.redis_url: str | None = None
        self.processes: dict[str, Process] = {}
        self._celery: Celery | None = None
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PORT": str(self.port),
            "APP_ENV": "production",
            "LOG_LEVEL": "WARNING",
            "JWT_SECRET_KEY": self.jwt_secret,
            "MASTER_KEY": secrets.token_hex(32),
            "ALLOW_PRIVATE_DESTINATIONS": "true",
            "INSTANCE_PATH": str(self.instance),
            **extra_env,
        }
        for name_ in ("DATABASE_URL", "REDIS_URL"):
            env.pop(name_, None)
        if source != ROOT:
            env["PYTHONPATH"] = str(source)  # ahead of the editable install, which points at ROOT
        if not embedded:
            self.database = Database()
            env["DATABASE_URL"] = self.database.url
            self.redis_url = f"{REDIS_BASE_URL}/{redis_db}"
            redis.Redis.from_url(self.redis_url).flushdb()
            env["REDIS_URL"] = self.redis_url
        self.env = env

    def run_release(self) -> None:
        process = self.start("release")
        process.popen.wait(120)
        if process.popen.returncode != 0:
            raise RuntimeError(f"release failed:\n{process.log_tail()}")
        process.stop()

    def start(self, name: str, command: str | None = None, env: dict[str, str] | None = None) -> Process:
        home = self.instance / f"home-{name}"
        home.mkdir(exist_ok=True)
        process = Process(
            name,
            ["sh", "-c", command or self.commands[name]],
            # gunicorn puts its control socket under $HOME: the service's and the floor's must not share one.
            env={**(env or self.env), "HOME": str(home)},
            cwd=self.source,
            log_dir=self.log_dir,
        )
        self.processes[name] = process
        return process

    def celery(self) -> Celery:
        """A producer configured as the web process is, less the result backend: only the worker's work counts."""
        if self._celery is None:
            self._celery = Celery(f"bench-{self.name}", set_as_current=False)
            self._celery.config_from_object(celery_config(self.env, self.instance, results=False))
        return self._celery

    def start_web(self, command: str | None = None, env: dict[str, str] | None = None) -> Process:
        """The Procfile's web line, or `command` (a variant of it) with `env` in place of the stack's."""
        process = self.start("web", command, env)
        wait_until(
            lambda: httpx.get(f"{self.base_url}/api/health", timeout=2).status_code == 200,
            seconds=90,
            what="the web process to answer /api/health",
            process=process,
        )
        return process

    def start_worker(self) -> Process:
        process = self.start("worker")
        log = process.log_path
        control = self.celery().control if self.redis_url else None

        def ready() -> bool:
            # The banner's "ready." shows only at INFO. On Redis, the worker answers a ping once it consumes
            # (asking /api/health/ready instead would meet its rate limit when a figure restarts the worker).
            if b" ready." in log.read_bytes():
                return True
            if control is not None:
                return bool(control.ping(timeout=0.5))
            return httpx.get(f"{self.base_url}/api/health/ready", timeout=5).status_code == 200

        wait_until(ready, seconds=90, what="the worker to be ready", process=process)
        return process

    def restart(self, name: str) -> Process:
        self.processes.pop(name).stop()
        return self.start_web() if name == "web" else self.start_worker()

    def stop(self) -> None:
        errors: list[BaseException] = []
        for process in reversed(list(self.processes.values())):
            try:
                process.stop()
            except BaseException as exc:  # keep stopping the rest
                errors.append(exc)
        self.processes.clear()
        if self._celery is not None:
            self._celery.close()
            self._celery = None
        if self.database is not None:
            try:
                self.database.drop()
            except BaseException as exc:
                errors.append(exc)
            self.database = None
        if self.redis_url is not None:
            try:
                redis.Redis.from_url(self.redis_url).flushdb()
            except BaseException as exc:
                errors.append(exc)
        shutil.rmtree(self.instance, ignore_errors=True)
        if errors:
            raise errors[0]
