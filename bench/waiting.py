"""Figure 7, waiting: how the web process waits on tests, and what an unrelated Host sees meanwhile.

A test request holds its web worker until the test's outcome (up to TEST_DELIVERY_TIMEOUT). Here 100 tests
are sent at once to email connectors of 100 Hosts (each Host may test 10 times an hour; a connector has one
test in flight) whose SMTP server is a tarpit: it accepts and never answers, so every admitted test waits
for PROVIDER_TIMEOUT. Meanwhile other Hosts list their connectors (10 each) at PROBE_RATE requests a second,
and the same is measured with no tests running ("idle"), runs alternating. Reported per variant of the web
command: the list's median and p95, idle and under the tarpit load, and how the 100 tests ended (503 busy at
once, or waited for the provider's timeout).

Variants: the Procfile's web command as configured (gthread, 2 processes x 16 threads, 8 waits each);
`gunicorn -k gevent wsgi:app` (the same command with `-k gevent`: same worker count and waits); and each
with room for all 100 tests (TEST_WAITS_PER_PROCESS=50; 64 threads for gthread). gevent variants run only
when gevent is importable (`.venv/bin/pip install gevent`; it is no dependency of the service).

Then a check of gevent itself (`bench/gevent_probe.py`): in real gevent workers, do psycopg and redis
yield while they wait, over TLS for Redis (rediss:// through a TLS proxy, `bench.peers tls-proxy`), and
does the service still answer lists and tests there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import seed
from bench.figures import EMAIL_DESTINATION, Row, Settings, _email_config
from bench.load import median
from bench.stack import (
    REDIS_BASE_URL,
    REDIS_DB,
    ROOT,
    Process,
    Stack,
    command_line,
    memory_kib,
    start_peer,
    wait_until,
)

TARPIT_TESTS = 100
TESTS_PER_HOST = 1
PROBE_RATE = 20.0  # list requests a second from the unrelated Hosts
PROBE_HOSTS = 10  # per window: 17 lists each, within their 100 a minute
WINDOW_START, WINDOW_SECONDS = 0.5, 8.5  # after the tests are sent; PROVIDER_TIMEOUT (10 s) ends the first ones
MAX_RUNS = 3
ROOMY = "50"  # TEST_WAITS_PER_PROCESS that admits all 100 tests on 2 processes
PROBE_GREENLETS, PROBE_SECONDS = 5, 0.3  # bench/gevent_probe.py's waits, given to it in its environment


@dataclass
class Variant:
    name: str
    gevent: bool
    env: dict[str, str] = field(default_factory=dict)

    def command(self, procfile_web: str) -> str:
        if not self.gevent:
            return procfile_web
        if not procfile_web.startswith("gunicorn "):
            raise RuntimeError(f"the Procfile's web command does not start with gunicorn: {procfile_web}")
        return procfile_web.replace("gunicorn ", "gunicorn -k gevent ", 1)


VARIANTS = (
    Variant("gthread (as configured)", gevent=False),
    Variant("gevent (-k gevent)", gevent=True),
    Variant(
        "gthread, 64 threads, 50 waits", gevent=False, env={"GUNICORN_THREADS": "64", "TEST_WAITS_PER_PROCESS": ROOMY}
    ),
    Variant("gevent, 50 waits", gevent=True, env={"TEST_WAITS_PER_PROCESS": ROOMY}),
)


def gevent_installed() -> bool:
    return importlib.util.find_spec("gevent") is not None


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def _probe(base_url: str, hosts: Sequence[seed.Host], seconds: float) -> tuple[list[float], dict[int, int]]:
    """Paced lists by `hosts` in turn for `seconds`: latencies in ms and the statuses answered."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    interval = 1 / PROBE_RATE
    with httpx.Client(base_url=base_url, timeout=30) as client:
        started = time.monotonic()
        number = 0
        while (now := time.monotonic()) < started + seconds:
            host = hosts[number % len(hosts)]
            number += 1
            answer = client.get("/api/connectors", headers={"Authorization": f"Bearer {host.token}"})
            elapsed = time.monotonic() - now
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            if answer.status_code == 200:
                latencies.append(elapsed * 1000)
            time.sleep(max(0.0, started + number * interval - time.monotonic()))
    return latencies, statuses


def _fire(
    base_url: str, hosts: Sequence[seed.Host], fired: threading.Event | None = None
) -> list[tuple[int, str, float]]:
    """One test per Host's connector, all at once (`fired` is set then): (status, error_code, seconds) each."""
    gate = threading.Barrier(len(hosts), action=fired.set if fired else None)
    body = {"test_destination": EMAIL_DESTINATION}
    # Made before the gate: a client's set-up costs milliseconds of CPU, which would spread the tests out.
    clients = {host.id: httpx.Client(base_url=base_url, timeout=60, verify=False) for host in hosts}

    def one(host: seed.Host) -> tuple[int, str, float]:
        with clients[host.id] as client:
            gate.wait()
            started = time.monotonic()
            try:
                answer = client.post(
                    f"/api/connectors/{host.connector_ids[0]}/test",
                    json=body,
                    headers={"Authorization": f"Bearer {host.token}"},
                )
            except httpx.HTTPError as exc:
                return 0, type(exc).__name__, time.monotonic() - started
            try:
                code = str(answer.json().get("error_code") or "")
            except ValueError:
                code = answer.text[:60]
            return answer.status_code, code, time.monotonic() - started

    with ThreadPoolExecutor(len(hosts)) as pool:
        return list(pool.map(one, hosts))


def _loaded_window(
    base_url: str, tarpit_hosts: Sequence[seed.Host], probe_hosts: Sequence[seed.Host]
) -> tuple[list[float], dict[int, int], list[tuple[int, str, float]]]:
    """The tarpit tests sent at once, and the lists' probe from WINDOW_START after them; both ended."""
    fired: list[list[tuple[int, str, float]]] = []
    sent = threading.Event()
    shooter = threading.Thread(target=lambda: fired.append(_fire(base_url, tarpit_hosts, sent)))
    shooter.start()
    if not sent.wait(30):
        raise RuntimeError("the tarpit tests were not sent")
    time.sleep(WINDOW_START)
    latencies, answered = _probe(base_url, probe_hosts, WINDOW_SECONDS)
    shooter.join()
    if not fired:
        raise RuntimeError("the tarpit tests failed in the benchmark; see its output")
    return latencies, answered, fired[0]


def _quiet(stack: Stack, seconds: float = 90) -> None:
    """Until no test is open any more: the worker's threads are free for the next run."""
    assert stack.database is not None

    def no_open() -> bool:
        with stack.database.connect() as conn:  # type: ignore[union-attr]
            row = conn.execute("SELECT count(*) FROM delivery_attempts WHERE status IN ('pending', 'sending')")
            return (row.fetchone() or (1,))[0] == 0

    wait_until(no_open, seconds=seconds, what="the tarpit tests to end")


def _log_problems(process: Process, since: int = 0) -> dict[str, int]:
    """Lines of the process's log (from byte `since`) that tell of an error or a warning, counted."""
    words = ("Traceback", "Warning", "RecursionError", "LoopExit", "Error", "WARNING")
    with open(process.log_path, "rb") as handle:
        handle.seek(since)
        lines = handle.read().decode(errors="replace").splitlines()
    found: dict[str, int] = {}
    for line in lines:
        if any(word in line for word in words) and not line.startswith("bench probe:"):
            found[line[:160]] = found.get(line[:160], 0) + 1
    return found


def _summary(problems: dict[str, int]) -> dict[str, int]:
    """The log's trouble by kind: finalizers failing (at exit), gevent's warnings, the app's own lines."""
    kinds = {
        "finalizer errors ('Exception ignored in')": lambda line: line.startswith("Exception ignored in"),
        "MonkeyPatchWarning": lambda line: "MonkeyPatchWarning" in line,
        "app warnings and errors": lambda line: line.startswith("{"),
        "tracebacks": lambda line: line.startswith("Traceback"),
    }
    counted = {kind: sum(n for line, n in problems.items() if test(line)) for kind, test in kinds.items()}
    return {kind: count for kind, count in counted.items() if count}


def _log_size(stack: Stack, name: str = "web") -> int:
    """Where the next process called `name` starts writing in its log (logs are appended to)."""
    path = stack.log_dir / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


def _web_state(stack: Stack) -> dict[str, Any]:
    """What the web process holds after its runs: its workers' peak RSS, and its Redis pub/sub subscriptions
    (a test's result is awaited on a channel of its own, unsubscribed once the test is answered)."""
    web = stack.processes["web"]
    master = web.pid
    for pid in web.tree():
        if "gunicorn" in command_line(pid):
            master = pid
            break
    workers = [pid for pid in web.tree() if pid != master and "gunicorn" in command_line(pid)]
    database = int((stack.redis_url or "/0").rsplit("/", 1)[1])
    clients = [c for c in redis.Redis.from_url(REDIS_BASE_URL).client_list() if int(c.get("db", -1)) == database]
    return {
        "worker_peak_mib": [round(memory_kib(pid)[1] / 1024, 1) for pid in workers],
        "subscriptions": sum(int(c.get("sub", 0)) + int(c.get("psub", 0)) for c in clients),
    }


def waiting(settings: Settings, log_dir: Path, source: Path, tarpit_port: int, smtp_port: int) -> list[Row]:
    variants = [variant for variant in VARIANTS if gevent_installed() or not variant.gevent]
    runs = min(settings.runs, MAX_RUNS)
    stack = Stack("waiting", embedded=False, log_dir=log_dir, extra_env={}, source=source, redis_db=REDIS_DB + 3)
    results: dict[str, Any] = {}
    rows: list[Row] = []
    try:
        stack.run_release()
        assert stack.database is not None
        tarpit = _email_config(tarpit_port, "127.0.0.1", security="none")
        windows = len(variants) * runs
        tarpit_hosts = [seed.new_hosts(stack.jwt_secret, TARPIT_TESTS // TESTS_PER_HOST) for _ in range(windows)]
        probe_hosts = [seed.new_hosts(stack.jwt_secret, PROBE_HOSTS) for _ in range(2 * windows + len(variants))]
        with stack.database.connect() as conn:
            for hosts in tarpit_hosts:
                seed.insert_sealed_connectors(conn, stack.env["MASTER_KEY"], hosts, "email", tarpit, TESTS_PER_HOST)
            seed.insert_hosts(conn, [host for hosts in probe_hosts for host in hosts], connectors_each=10)
            seed.analyze(conn)
        stack.start_worker()
        procfile_web = stack.commands["web"]
        window = 0
        for variant in variants:
            settings.log(f"  {variant.name}: {variant.command(procfile_web)} {variant.env or ''}")
            log_from = _log_size(stack)
            stack.start_web(variant.command(procfile_web), {**stack.env, **variant.env})
            _probe(stack.base_url, probe_hosts.pop(), 2.0)  # warm-up
            idle: list[tuple[float, float]] = []
            loaded: list[tuple[float, float]] = []
            outcomes: dict[str, int] = {}
            statuses: dict[str, dict[int, int]] = {"idle": {}, "loaded": {}}
            slowest: list[float] = []
            for run in range(runs):
                for step in ("idle", "loaded") if run % 2 == 0 else ("loaded", "idle"):
                    hosts = probe_hosts.pop()
                    if step == "idle":
                        latencies, answered = _probe(stack.base_url, hosts, WINDOW_SECONDS)
                        idle.append((median(latencies), _percentile(latencies, 0.95)))
                    else:
                        latencies, answered, fired = _loaded_window(stack.base_url, tarpit_hosts[window], hosts)
                        window += 1
                        loaded.append((median(latencies), _percentile(latencies, 0.95)))
                        for status, code, _ in fired:
                            label = f"{status} {code}".strip()
                            outcomes[label] = outcomes.get(label, 0) + 1
                        slowest.append(max(seconds for _, _, seconds in fired))
                        _quiet(stack)
                    for status, count in answered.items():
                        statuses[step][status] = statuses[step].get(status, 0) + count
            state = _web_state(stack)
            web = stack.processes.pop("web")
            web.stop()
            # Read after the stop: objects that live until the worker exits complain there.
            problems = _log_problems(web, log_from)
            summary = _summary(problems)
            busy = sum(count for label, count in outcomes.items() if label.startswith("503"))
            waited = sum(count for label, count in outcomes.items() if label.startswith("502"))
            results[variant.name] = {
                "idle_ms": idle,
                "loaded_ms": loaded,
                "outcomes": outcomes,
                "statuses": statuses,
                "slowest_test_s": slowest,
                "log_problems": problems,
                "log_summary": summary,
                **state,
            }
            other = {label: count for label, count in outcomes.items() if not label.startswith(("503", "502"))}
            bad_lists = {
                step: {status: count for status, count in answered.items() if status != 200}
                for step, answered in statuses.items()
            }
            note = (
                f"per run: {busy / runs:.0f} tests 503 busy, {waited / runs:.0f} waited (502 at the provider "
                f"timeout); web workers' peak RSS {state['worker_peak_mib']} MiB; {state['subscriptions']} "
                "result subscriptions left open"
            )
            if other:
                note += f"; other test answers {other}"
            if any(bad_lists.values()):
                note += f"; lists not 200: {bad_lists}"
            if summary:
                note += f"; web log: {summary}"
            for label, index in (("median", 0), ("p95", 1)):
                quiet, busy_value = median([r[index] for r in idle]), median([r[index] for r in loaded])
                rows.append(
                    Row(
                        "7 Waiting",
                        f"{variant.name}: GET /api/connectors {label}, 100 tarpit tests (floor: idle)",
                        "ms",
                        busy_value,
                        quiet,
                        busy_value / quiet,
                        target="(reported)",
                        note=note if label == "median" else "",
                    )
                )
            settings.log(
                f"    list p50 {rows[-2].floor:.1f} -> {rows[-2].service:.1f} ms, "
                f"p95 {rows[-1].floor:.1f} -> {rows[-1].service:.1f} ms; tests {outcomes}"
            )
        if gevent_installed():
            rows += _gevent_check(settings, stack, log_dir, results, smtp_port)
        else:
            rows.append(
                Row("7 Waiting", "gevent variants", "", 0, note="skipped: gevent is not installed in this venv")
            )
    finally:
        stack.stop()
    settings.results["waiting"] = results
    return rows


def _gevent_check(
    settings: Settings, stack: Stack, log_dir: Path, results: dict[str, Any], smtp_port: int
) -> list[Row]:
    """Real gevent workers: do psycopg and redis yield, over TLS too, and does the service still work."""
    assert stack.redis_url is not None
    redis_address = REDIS_BASE_URL.split("://", 1)[1].split("/", 1)[0]
    proxy, proxy_port = start_peer("tls-proxy", log_dir, "--target", redis_address)
    rows: list[Row] = []
    try:
        hosts = seed.new_hosts(stack.jwt_secret, 5)
        with stack.database.connect() as conn:  # type: ignore[union-attr]
            config = _email_config(smtp_port, "127.0.0.1", security="none")
            seed.insert_sealed_connectors(conn, stack.env["MASTER_KEY"], hosts, "email", config, 1)
        probe_conf = str(ROOT / "bench" / "gevent_probe.py")
        command = (
            Variant("probe", gevent=True)
            .command(stack.commands["web"])
            .replace("gunicorn ", f"gunicorn -c {probe_conf} ", 1)
        )
        database = stack.redis_url.rsplit("/", 1)[1]
        cases = {
            "gevent, as run (rediss:// via TLS proxy)": {
                "REDIS_URL": f"rediss://127.0.0.1:{proxy_port}/{database}",
                "REDIS_SSL_CERT_REQS": "none",
            },
            "gevent, PSYCOPG_WAIT_FUNC=wait_poll": {"PSYCOPG_WAIT_FUNC": "wait_poll"},
        }
        for name, extra in cases.items():
            out = Path(stack.instance) / f"probe-{len(results)}"
            out.mkdir()
            env = {
                **stack.env,
                **extra,
                "BENCH_PROBE_OUT": str(out),
                "BENCH_PROBE_GREENLETS": str(PROBE_GREENLETS),
                "BENCH_PROBE_SECONDS": str(PROBE_SECONDS),
            }
            log_from = _log_size(stack)
            stack.start_web(command, env)
            workers = int(env.get("WEB_CONCURRENCY") or 2)
            wait_until(
                lambda out_=out, workers_=workers: len(list(out_.glob("probe-*.json"))) >= workers_,
                seconds=30,
                what="the probes",
            )
            probes = [json.loads(path.read_text()) for path in sorted(out.glob("probe-*.json"))]
            # The service over it: lists and tests (to the SMTP peer) answered as usual?
            lists, list_statuses = _probe(stack.base_url, hosts, 2.0)
            tests = _fire(stack.base_url, hosts)
            web = stack.processes.pop("web")
            web.stop()
            problems = _log_problems(web, log_from)
            results[name] = {"probes": probes, "list_statuses": list_statuses, "tests": tests, "problems": problems}
            first = probes[0]
            for library in ("psycopg", "redis"):
                found = first.get(library, {})
                rows.append(
                    Row(
                        "7 Waiting",
                        f"{name}: {PROBE_GREENLETS} {library} waits of {PROBE_SECONDS:g} s at once, wall (floor: one)",
                        "s",
                        float(found.get("wall_s", 0.0)),
                        PROBE_SECONDS,
                        float(found.get("wall_s", 0.0)) / PROBE_SECONDS,
                        check="yields" if found.get("yields") else "BLOCKS the process",
                        note="; ".join(
                            part
                            for part in (
                                f"psycopg wait function {first.get('psycopg_wait')}" if library == "psycopg" else "",
                                f"ticker {found.get('ticks')} of ~{found.get('ticks_if_yielding')} ticks",
                                f"errors {found.get('errors')}" if found.get("errors") else "",
                                first.get("error", ""),
                            )
                            if part
                        ),
                    )
                )
            ok_tests = sum(1 for status, _, _ in tests if status == 200)
            rows.append(
                Row(
                    "7 Waiting",
                    f"{name}: service still answers",
                    "",
                    0,
                    check=f"lists {list_statuses}, tests {ok_tests}/{len(tests)} sent",
                    met=ok_tests == len(tests) and set(list_statuses) == {200},
                    note=f"web log: {_summary(problems)}" if problems else "",
                )
            )
            settings.log(f"  {name}: probes {probes}; lists {list_statuses}; tests {tests}")
    finally:
        proxy.stop()
    return rows
