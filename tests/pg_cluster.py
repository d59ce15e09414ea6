"""A throwaway PostgreSQL server for tests that need to take the database away and bring it back.

    if not PgCluster.available():
        pytest.skip("PostgreSQL server binaries are not installed")
    with PgCluster() as cluster:
        url = cluster.create_database("app")
        ...
        cluster.stop()      # new connections are refused, open sessions are ended
        ...
        cluster.start()     # same port, same data

The server runs from a private temporary folder on a free loopback port with trust authentication, and is
tuned for speed, not durability. As root, initdb and postgres run as the `postgres` OS user, since both
refuse to run as root; as any other user they run as that user.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Literal

import psycopg
from psycopg import sql

StopMode = Literal["fast", "immediate"]

_SERVER_USER = "postgres"
# fast: end sessions, checkpoint, exit. immediate: end sessions and exit at once; the next start runs crash recovery.
_STOP_SIGNALS: dict[str, signal.Signals] = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}
# Speed over durability: the data only has to survive a server stop, never a machine crash. synchronous_commit
# stays on: with fsync off a commit costs only a write() to the page cache, while turning it off lets an
# immediate stop lose commits the client was already told had succeeded.
_FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "full_page_writes": "off",
    "listen_addresses": "127.0.0.1",
}

_templates: dict[Path, Path] = {}
_template_lock = threading.Lock()


def _bin_dir() -> Path | None:
    """The bin folder of the newest PostgreSQL installed, or the one whose initdb is on PATH."""
    candidates = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        version = re.match(r"\d+", path.parent.name)
        if version and (path / "initdb").is_file() and (path / "postgres").is_file():
            candidates.append((int(version.group()), path))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")  # not the Debian pg_wrapper scripts, which live in /usr/bin without initdb
    if initdb and (Path(initdb).parent / "postgres").is_file():
        return Path(initdb).parent
    return None


def _scratch_parent() -> str:
    """Where clusters live: /dev/shm when it is roomy, as copying and writing a cluster there is ~10x faster.

    Docker gives /dev/shm 64 MB by default, too little for a template and a cluster of ~40 MB each.
    The path stays short either way: the socket path must fit in the 107 bytes a Unix socket name allows.
    """
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return "/tmp"
    return "/dev/shm" if stats.f_bavail * stats.f_frsize >= 1 << 30 else "/tmp"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    """One PostgreSQL server: its own data folder, port and socket folder, removed by close()."""

    def __init__(self, settings: dict[str, str] | None = None, ready_timeout: float = 30.0) -> None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries found (initdb and postgres)")
        self.bin_dir = bin_dir
        self.settings = {**_FAST_SETTINGS, **(settings or {})}
        self.ready_timeout = ready_timeout
        self.port = _free_port()  # kept for the cluster's life, so a restart comes back where clients expect it
        self.base_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._initialized = False
        # Root must hand the server to the postgres user; anyone else runs it as themselves.
        self._account = pwd.getpwnam(_SERVER_USER) if os.geteuid() == 0 else None

    @staticmethod
    def available() -> bool:
        """Whether this machine can run a cluster: server binaries, and a postgres user when running as root."""
        if _bin_dir() is None:
            return False
        if os.geteuid() != 0:
            return True
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            return False
        return True

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        """A libpq URL; SQLAlchemy needs `postgresql+psycopg://` in its place (app.config rewrites it)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def data_dir(self) -> Path:
        return self._base() / "data"

    @property
    def log_file(self) -> Path:
        return self._base() / "server.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (creating the cluster the first time) and return once it accepts connections."""
        if self.running:
            return
        if not self._initialized:
            self._init()
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        settings = {**self.settings, "unix_socket_directories": str(self._base())}
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.log_file, "ab") as log:
            # A session of its own: a Ctrl-C in the terminal must not reach the server, and killpg can
            # reach its children if it ever has to.
            self._process = self._spawn(
                command, self._base(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_until_ready()

    def stop(self, mode: StopMode = "fast", timeout: float = 10.0) -> None:
        """Stop the server, ending open sessions; on return the port refuses connections."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is not None:
            return
        process.send_signal(_STOP_SIGNALS[mode])
        try:
            # The postmaster exits after its children, so once it is gone nothing listens on the port.
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout)

    def restart(self, mode: StopMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def create_database(self, name: str) -> str:
        """Create a database and return its URL."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def close(self) -> None:
        """Stop the server and remove its folder; safe to call more than once."""
        atexit.unregister(self.close)
        try:
            self.stop("immediate")  # the data is about to be deleted, so nothing is worth a checkpoint
        finally:
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None
                self._initialized = False

    def __enter__(self) -> PgCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        if self.base_dir is None:
            return "(no server log)"
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _base(self) -> Path:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="pgcluster-", dir=_scratch_parent()))
            # A process killed before close() still gets its server stopped and folder removed at exit.
            atexit.register(self.close)
            if self._account is not None:
                os.chown(self.base_dir, self._account.pw_uid, self._account.pw_gid)
        return self.base_dir

    def _init(self) -> None:
        # Copying a ready-made cluster takes a fraction of initdb's time; cp -a keeps the postgres ownership.
        template = self._template()
        result = subprocess.run(["cp", "-a", str(template), str(self.data_dir)], capture_output=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"copying the template cluster failed: {result.stderr.decode(errors='replace')}")
        self._initialized = True

    def _template(self) -> Path:
        """A cluster made by initdb once per process and bin folder, never started, copied for each cluster."""
        with _template_lock:
            template = _templates.get(self.bin_dir)
            if template is not None and template.is_dir():
                return template
            folder = Path(tempfile.mkdtemp(prefix="pgtemplate-", dir=_scratch_parent()))
            atexit.register(shutil.rmtree, folder, True)
            if self._account is not None:
                os.chown(folder, self._account.pw_uid, self._account.pw_gid)
            template = folder / "data"
            command = [
                str(self.bin_dir / "initdb"),
                "-D",
                str(template),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",  # the same sort order everywhere, whatever locales the machine has
            ]
            usage = subprocess.run([command[0], "--help"], capture_output=True, text=True, check=False).stdout
            if "--no-instructions" in usage:  # added in PostgreSQL 14
                command.append("--no-instructions")
            process = self._spawn(command, folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            output, _ = process.communicate()
            if process.returncode != 0:
                shutil.rmtree(folder, ignore_errors=True)
                raise RuntimeError(f"initdb failed ({process.returncode}):\n{output.decode(errors='replace')}")
            _templates[self.bin_dir] = template
            return template

    def _spawn(self, command: list[str], cwd: Path, **kwargs: object) -> subprocess.Popen[bytes]:
        # PG* variables from the caller's environment (PGDATA, PGPORT...) must not steer this server.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        account = {}
        if self._account is not None:
            # Dropping root fully: the postgres uid, its group, and none of root's extra groups.
            account = {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}
        # cwd: root's own working folder may be unreadable to postgres, which makes initdb complain.
        return subprocess.Popen(command, cwd=cwd, env=env, **account, **kwargs)  # type: ignore[call-overload]

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                self._process = None
                raise RuntimeError(f"PostgreSQL exited while starting (code {code}); log tail:\n{self.log_tail()}")
            try:
                # A real connection, not just an open port: the server refuses sessions while it recovers.
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError as error:
                last_error = error
            time.sleep(0.02)
        self.stop("immediate")
        raise RuntimeError(
            f"PostgreSQL did not accept connections within {self.ready_timeout}s ({last_error}); "
            f"log tail:\n{self.log_tail()}"
        )
