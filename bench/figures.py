"""The five figures of the benchmark: each measures the service and its floor in the same run and returns rows.

Runs of the service and of its floor alternate, so slow spells of this shared machine fall on both alike.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from celery import Celery

from bench import seed
from bench.load import Line, WrkResult, median, write_lines, wrk
from bench.peers import SMTP_PASSWORD, SMTP_USER, TELEGRAM_TOKEN
from bench.stack import (
    REDIS_DB,
    ROOT,
    Process,
    Stack,
    command_line,
    free_port,
    memory_kib,
    pythonpath_with_root,
    wait_until,
)

CONNECTIONS = 32  # the Procfile's gunicorn serves 2 processes x 16 threads
WARMUP_SECONDS = 2.0
EMAIL_DESTINATION = "survivor@example.com"
TELEGRAM_CHAT = "123456789"
TASK_NAME = "deliveries.send_test"


@dataclass
class Row:
    figure: str
    measure: str
    unit: str
    service: float
    floor: float | None = None
    ratio: float | None = None
    check: str = ""  # the number the target is about, when it is not the ratio
    target: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Settings:
    runs: int
    seconds: float
    work: Path
    log: Callable[[str], None]
    results: dict[str, Any] = field(default_factory=dict)


def _auth(host: seed.Host) -> dict[str, str]:
    return {"Authorization": f"Bearer {host.token}"}


def _slices(hosts: Sequence[seed.Host], count: int) -> list[list[seed.Host]]:
    size = len(hosts) // count
    return [list(hosts[i * size : (i + 1) * size]) for i in range(count)]


def _clean(results: Sequence[WrkResult]) -> str:
    bad = sum(result.unexpected for result in results)
    if not bad:
        return ""
    causes: dict[str, int] = {}
    for result in results:
        for status, count in result.statuses.items():
            if 300 <= status < 400:
                causes[str(status)] = causes.get(str(status), 0) + count
        for cause, count in result.codes.items():
            causes[cause] = causes.get(cause, 0) + count
    if sockets := sum(result.socket_errors for result in results):
        causes["socket errors"] = sockets
    return f"{bad} unexpected answers {causes}"


# --- 1. CRUD ---------------------------------------------------------------------------------------------

LIST_HOSTS_PER_RUN = 150  # 100 list requests a minute each: room for 15,000 requests a run
POST_HOSTS_PER_RUN = 400  # 10 creations an hour each: room for 4,000 a run
PUT_HOSTS = 100


def _email_config(port: int = 587, host: str = "smtp.example.com", **extra: str) -> dict[str, Any]:
    return {
        "smtp_host": host,
        "smtp_port": port,
        "username": SMTP_USER,
        "password": SMTP_PASSWORD,
        "from_address": "noreply@bapba.example",
        **extra,
    }


def crud(settings: Settings, stack: Stack) -> list[Row]:
    assert stack.database is not None
    slices = settings.runs + 1  # the first slice warms up
    list_hosts = seed.new_hosts(stack.jwt_secret, slices * LIST_HOSTS_PER_RUN)
    put_hosts = seed.new_hosts(stack.jwt_secret, PUT_HOSTS)
    post_hosts = seed.new_hosts(stack.jwt_secret, slices * POST_HOSTS_PER_RUN)
    with stack.database.connect() as conn:
        seed.insert_hosts(conn, [*list_hosts, *put_hosts], connectors_each=10)
        seed.analyze(conn)

    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        listed = client.get("/api/connectors", headers=_auth(list_hosts[0]))
        updated = client.put(
            f"/api/connectors/{put_hosts[0].connector_ids[0]}",
            json={"name": "captured", "priority": 1},
            headers=_auth(put_hosts[0]),
        )
    if listed.status_code != 200 or len(listed.json()["connectors"]) != 10 or updated.status_code != 200:
        raise RuntimeError(f"unexpected answers while preparing: {listed.text[:300]} {updated.text[:300]}")
    bodies = settings.work / "floor-bodies.json"
    bodies.write_text(json.dumps({"list": listed.json(), "one": updated.json()}))

    web_command = stack.commands["web"]
    if "wsgi:app" not in web_command:
        raise RuntimeError(f"the Procfile's web command does not serve wsgi:app: {web_command}")
    floor_port = free_port()
    floor = stack.start(
        "floor",
        command=web_command.replace("wsgi:app", "bench.floor:app", 1),
        env={
            **stack.env,
            "PORT": str(floor_port),
            "BENCH_FLOOR_BODIES": str(bodies),
            "PYTHONPATH": pythonpath_with_root(stack.env),
        },
    )
    floor_url = f"http://127.0.0.1:{floor_port}"
    wait_until(
        lambda: httpx.get(f"{floor_url}/api/health", timeout=2).status_code == 200,
        seconds=60,
        what="the floor app",
        process=floor,
    )

    post_body = json.dumps(
        {"type": "email", "name": "bench {n}", "config": _email_config(), "priority": 0}, separators=(",", ":")
    )
    put_lines = [
        Line("PUT", f"/api/connectors/{connector_id}", host.token, '{"name":"renamed {n}","priority":2}')
        for host in put_hosts
        for connector_id in host.connector_ids
    ]
    endpoints: dict[str, list[list[Line]]] = {
        "GET /api/connectors (10 connectors)": [
            [Line("GET", "/api/connectors", host.token) for host in part] for part in _slices(list_hosts, slices)
        ],
        "POST /api/connectors": [
            [Line("POST", "/api/connectors", host.token, post_body) for host in part]
            for part in _slices(post_hosts, slices)
        ],
        "PUT /api/connectors/:id": [put_lines] * slices,
    }

    rows: list[Row] = []
    try:
        for endpoint, line_slices in endpoints.items():
            files = [write_lines(settings.work / f"crud-{i}.tsv", lines) for i, lines in enumerate(line_slices)]
            service: list[WrkResult] = []
            bare: list[WrkResult] = []
            wrk(stack.base_url, files[0], connections=CONNECTIONS, seconds=WARMUP_SECONDS)
            wrk(floor_url, files[0], connections=CONNECTIONS, seconds=WARMUP_SECONDS)
            for run in range(settings.runs):
                pair = [(stack.base_url, service), (floor_url, bare)]
                for url, into in pair if run % 2 == 0 else reversed(pair):
                    into.append(wrk(url, files[run + 1], connections=CONNECTIONS, seconds=settings.seconds))
            service_rate = median([r.rate for r in service])
            floor_rate = median([r.rate for r in bare])
            ratio = service_rate / floor_rate
            is_list = endpoint.startswith("GET")
            settings.log(f"  {endpoint}: {service_rate:.0f} req/s against {floor_rate:.0f} req/s ({ratio:.2f})")
            settings.results[f"crud {endpoint}"] = {
                "service_rates": [r.rate for r in service],
                "floor_rates": [r.rate for r in bare],
                "service_p50_ms": [r.p50_ms for r in service],
                "floor_p50_ms": [r.p50_ms for r in bare],
            }
            note = _clean(service + bare)
            rows.append(
                Row(
                    "1 CRUD",
                    f"{endpoint} throughput",
                    "req/s",
                    service_rate,
                    floor_rate,
                    ratio,
                    target=">= 0.5 of floor" if is_list else "(reported)",
                    met=ratio >= 0.5 if is_list else None,
                    note="; ".join(
                        part
                        for part in (
                            f"p50 {median([r.p50_ms for r in service]):.1f} ms vs "
                            f"{median([r.p50_ms for r in bare]):.1f} ms",
                            note,
                        )
                        if part
                    ),
                )
            )
    finally:
        stack.processes.pop("floor").stop()
    return rows


# --- 2. Test delivery overhead ---------------------------------------------------------------------------

PROBE_HOSTS = 60  # room for 600 tests in the warm-up
FLOOR_SENDS = {1: 150, 8: 400}


def _smtp_floor(port: int, count: int, concurrency: int) -> tuple[float, float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.smtp_floor", "--port", str(port), "--count", str(count),
         "--concurrency", str(concurrency)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    latencies = sorted(json.loads(done.stdout)["latencies_ms"])
    return median(latencies), latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)]


def _tests_done(stack: Stack) -> None:
    """Until the tests wrk left in flight when it stopped are answered: they hold wait slots (TEST_WAITS_PER_PROCESS),
    and the next run's first tests would meet them as 503 busy."""
    if stack.database is None:
        time.sleep(2.0)  # the embedded SQLite database: a test takes well under a second here
        return

    def none_open() -> bool:
        with stack.database.connect() as conn:  # type: ignore[union-attr]
            row = conn.execute("SELECT count(*) FROM delivery_attempts WHERE status IN ('pending', 'sending')")
            return (row.fetchone() or (1,))[0] == 0

    wait_until(none_open, seconds=60, what="the tests in flight to end")
    time.sleep(0.1)  # the answer leaves the web after the attempt is closed


def test_delivery(settings: Settings, stack: Stack, smtp_port: int, transport: str, target_ms: float) -> list[Row]:
    concurrencies = (1, 8)
    body = {"type": "email", "name": "loopback smtp", "config": _email_config(smtp_port, "127.0.0.1", security="none")}
    test_body = json.dumps({"test_destination": EMAIL_DESTINATION})

    def lines_file(name: str, hosts: Sequence[seed.Host]) -> Path:
        lines = [Line("POST", f"/api/connectors/{host.connector_ids[0]}/test", host.token, test_body) for host in hosts]
        return write_lines(settings.work / f"test-{transport}-{name}.tsv", lines)

    # A warm-up at the higher concurrency tells how many Hosts a run needs (each may test 10 times an hour).
    probe = seed.new_hosts(stack.jwt_secret, PROBE_HOSTS)
    seed.api_create(stack.base_url, probe, body)
    warm = wrk(stack.base_url, lines_file("probe", probe), connections=max(concurrencies), seconds=WARMUP_SECONDS)
    # Room for 4 times the warm-up's rate: on this shared machine a run can be twice as fast as the warm-up,
    # and a Host that runs out answers 429s instead of tests.
    per_run = math.ceil(4 * warm.rate * settings.seconds / 10) + 10
    hosts = seed.new_hosts(stack.jwt_secret, per_run * len(concurrencies) * settings.runs)
    started = time.monotonic()
    if stack.database is not None:  # sealed and inserted as the API would, much faster than through it
        with stack.database.connect() as conn:
            seed.insert_sealed_connectors(conn, stack.env["MASTER_KEY"], hosts, "email", body["config"], 1)
    else:
        seed.api_create(stack.base_url, hosts, body)
    settings.log(f"  created {len(hosts)} email connectors in {time.monotonic() - started:.0f} s")
    files = [lines_file(str(i), part) for i, part in enumerate(_slices(hosts, len(concurrencies) * settings.runs))]
    _smtp_floor(smtp_port, 20, max(concurrencies))

    rows: list[Row] = []
    for index, concurrency in enumerate(concurrencies):
        own = files[index * settings.runs : (index + 1) * settings.runs]
        service: list[WrkResult] = []
        bare: list[tuple[float, float]] = []
        for run in range(settings.runs):
            for step in ("service", "floor") if run % 2 == 0 else ("floor", "service"):
                if step == "service":
                    service.append(wrk(stack.base_url, own[run], connections=concurrency, seconds=settings.seconds))
                    _tests_done(stack)
                else:
                    bare.append(_smtp_floor(smtp_port, FLOOR_SENDS[concurrency], concurrency))
        p50, p95 = median([r.p50_ms for r in service]), median([r.p95_ms for r in service])
        floor_p50, floor_p95 = median([b[0] for b in bare]), median([b[1] for b in bare])
        settings.results[f"test delivery {transport} c={concurrency}"] = {
            "service_p50_ms": [r.p50_ms for r in service],
            "service_p95_ms": [r.p95_ms for r in service],
            "floor_p50_ms": [b[0] for b in bare],
            "floor_p95_ms": [b[1] for b in bare],
            "service_rates": [r.rate for r in service],
        }
        settings.log(
            f"  {transport}, {concurrency} concurrent: p50 {p50:.1f} ms against {floor_p50:.1f} ms, "
            f"p95 {p95:.1f} ms against {floor_p95:.1f} ms"
        )
        note = _clean(service)
        rows.append(
            Row(
                "2 Test delivery",
                f"POST /test, {transport}, {concurrency} concurrent, median",
                "ms",
                p50,
                floor_p50,
                p50 / floor_p50,
                check=f"overhead {p50 - floor_p50:+.1f} ms",
                target=f"overhead <= {target_ms:g} ms",
                met=p50 - floor_p50 <= target_ms,
                note=note or f"{median([r.rate for r in service]):.0f} tests/s",
            )
        )
        rows.append(
            Row(
                "2 Test delivery",
                f"POST /test, {transport}, {concurrency} concurrent, p95",
                "ms",
                p95,
                floor_p95,
                p95 / floor_p95,
                check=f"overhead {p95 - floor_p95:+.1f} ms",
                target="(reported)",
            )
        )
    return rows


# --- 3. Worker throughput, and 4. the worker's memory ----------------------------------------------------

PROVIDER_SECONDS = 0.1
TOTAL_DELIVERIES = 10_000
WARMUP_DELIVERIES = 200
BATCH_SECONDS = 20.0


def _process_pid(process: Process, word: str) -> int:
    """The pid of the real program under the Procfile's `sh -c` (which may or may not exec it)."""
    for pid in process.tree()[1:] or [process.pid]:
        if word in command_line(pid):
            return pid
    raise RuntimeError(f"no {word} process under {process.name}")


def _pending_attempts(conn: psycopg.Connection, connector_ids: Sequence[uuid.UUID], tag: str) -> list[str]:
    """One pending test attempt per connector (a connector has at most one test in flight)."""
    present = {
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'delivery_attempts'"
        )
    }
    # Columns of the current schema; an older tree (`--source`) may lack them.
    extra = {"kind": "'test'", "connector_type": "'telegram'"}
    names = "".join(f", {name}" for name in extra if name in present)
    values = "".join(f", {value}" for name, value in extra.items() if name in present)
    rows = conn.execute(
        f"INSERT INTO delivery_attempts (id, connector_id, destination, status, created_at{names}) "  # noqa: S608
        f"SELECT gen_random_uuid(), c, %s, 'pending', now() AT TIME ZONE 'utc'{values} FROM unnest(%s::uuid[]) AS c "
        "RETURNING id",
        (tag, list(connector_ids)),
    ).fetchall()
    conn.commit()
    return [str(row[0]) for row in rows]


def _finished(conn: psycopg.Connection, tag: str) -> tuple[int, int]:
    done, failed = conn.execute(
        "SELECT count(*) FILTER (WHERE finished_at IS NOT NULL), count(*) FILTER (WHERE status = 'failed') "
        "FROM delivery_attempts WHERE destination = %s",
        (tag,),
    ).fetchone() or (0, 0)
    conn.commit()
    return int(done), int(failed)


def _steady_rate(conn: psycopg.Connection, tag: str) -> float:
    """Deliveries a second between the 10th and the 90th percentile of completions: ramp-up and drain aside."""
    times = [
        row[0]
        for row in conn.execute(
            "SELECT finished_at FROM delivery_attempts WHERE destination = %s ORDER BY finished_at", (tag,)
        )
    ]
    conn.commit()
    low, high = times[len(times) // 10], times[(len(times) * 9) // 10]
    return ((len(times) * 9) // 10 - len(times) // 10) / (high - low).total_seconds()


TELEGRAM_CONFIG = {"provider": "telegram", "bot_token": TELEGRAM_TOKEN}


def worker(settings: Settings, stack: Stack, pool: int) -> list[Row]:
    assert stack.database is not None
    batches = settings.runs
    # A connector has one test in flight at most: a batch needs as many connectors as it has deliveries.
    most = max(WARMUP_DELIVERIES, math.ceil(TOTAL_DELIVERIES / batches))
    hosts = seed.new_hosts(stack.jwt_secret, math.ceil(most / 10))
    with stack.database.connect() as conn:
        connectors = seed.insert_sealed_connectors(
            conn, stack.env["MASTER_KEY"], hosts, "telegram", TELEGRAM_CONFIG, 10
        )
    celery = stack.celery()
    worker_pid = _process_pid(stack.processes["worker"], "celery")
    ideal = pool / PROVIDER_SECONDS
    rates: list[float] = []
    failures = 0
    delivered = 0
    memory: list[tuple[int, int, int]] = []  # (delivered, rss KiB, peak KiB)

    with stack.database.connect() as conn, celery.producer_or_acquire() as producer:

        def batch(tag: str, count: int) -> float:
            ids = _pending_attempts(conn, connectors[:count], tag)
            started = time.monotonic()
            for attempt_id in ids:
                celery.send_task(TASK_NAME, args=[attempt_id, TELEGRAM_CHAT], queue="telegram", producer=producer)
            enqueued = time.monotonic() - started
            deadline = time.monotonic() + 60 + count / 10
            while (done := _finished(conn, tag))[0] < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {done[0]} of {count} deliveries finished; see {stack.log_dir}")
                time.sleep(0.25)
            nonlocal failures
            failures += done[1]
            rate = _steady_rate(conn, tag)
            settings.log(f"  batch {tag}: {count} deliveries, {rate:.0f}/s (enqueued in {enqueued:.1f} s)")
            return rate

        warm_rate = batch("warmup", WARMUP_DELIVERIES)
        delivered += WARMUP_DELIVERIES
        memory.append((delivered, *memory_kib(worker_pid)))
        # 10,000 deliveries in all, unless the worker is too slow to deliver them within the time budget.
        batch_size = max(WARMUP_DELIVERIES, min(most, int(warm_rate * BATCH_SECONDS)))
        for number in range(batches):
            rates.append(batch(f"batch-{number}", batch_size))
            delivered += batch_size
            memory.append((delivered, *memory_kib(worker_pid)))

    rate = median(rates)
    settings.results["worker"] = {"rates": rates, "ideal": ideal, "failures": failures, "memory_kib": memory}
    rows = [
        Row(
            "3 Worker",
            f"deliveries/s, pool {pool}, provider {PROVIDER_SECONDS * 1000:.0f} ms",
            "msg/s",
            rate,
            ideal,
            rate / ideal,
            target=">= 0.8 of ideal",
            met=rate / ideal >= 0.8,
            note=f"{failures} failed" if failures else "",
        )
    ]
    memory_row = _memory_row("worker (celery)", memory, delivered, "deliveries")
    if delivered < TOTAL_DELIVERIES:
        memory_row.note = f"10,000 deliveries would take {TOTAL_DELIVERIES / rate / 60:.0f} min at this rate"
    rows.append(memory_row)
    return rows


# --- The Celery floor of figures 2 and 3 ---------------------------------------------------------------------


def start_floor_worker(stack: Stack, redis_url: str) -> tuple[Process, Celery]:
    """The Procfile's worker command running `bench.celery_floor` on `redis_url`, ready; and its producer."""
    from bench.celery_floor import floor_celery

    command = stack.commands["worker"]
    if "-A celery_app" not in command:
        raise RuntimeError(f"the Procfile's worker command does not name -A celery_app: {command}")
    env = {
        **stack.env,
        "REDIS_URL": redis_url,
        "PYTHONPATH": pythonpath_with_root(stack.env),
        "BENCH_FLOOR_WORKER": "1",
    }
    process = stack.start("celery-floor", command=command.replace("-A celery_app", "-A bench.celery_floor", 1), env=env)
    celery = floor_celery(env)
    wait_until(
        lambda: celery.send_task("floor.noop", args=["x", "y"], queue="email").get(timeout=2) is not None,
        seconds=60,
        what="the Celery floor's worker",
        process=process,
    )
    return process, celery


FLOOR_ROUND_TRIPS = 300
FLOOR_SLEEPS = 2_000


def celery_floor(settings: Settings, stack: Stack, pool: int) -> list[Row]:
    """Celery alone, as the service configures and runs it: what no delivery code of ours could remove."""
    assert stack.redis_url is not None
    redis_url = f"{stack.redis_url.rsplit('/', 1)[0]}/{REDIS_DB + 2}"
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    process, celery = start_floor_worker(stack, redis_url)
    try:
        floor_pid = _process_pid(process, "celery")
        ready_kib = memory_kib(floor_pid)[0]
        p50s, p95s, rates = [], [], []
        for _ in range(settings.runs):
            # Figure 2's shape: send on a queue, wait for the result on pub/sub, forget it.
            times = []
            for number in range(FLOOR_ROUND_TRIPS):
                started = time.perf_counter()
                result = celery.send_task("floor.noop", args=[str(number), "y"], queue="email")
                result.get(timeout=10)
                result.forget()
                times.append((time.perf_counter() - started) * 1000)
            times = sorted(times[FLOOR_ROUND_TRIPS // 10 :])
            p50s.append(times[len(times) // 2])
            p95s.append(times[int(len(times) * 0.95)])
            # Figure 3's shape: a burst of jobs for the pool, each waiting the provider's 100 ms.
            client.flushdb()
            started = time.monotonic()
            with celery.producer_or_acquire() as producer:
                for number in range(FLOOR_SLEEPS):
                    celery.send_task("floor.sleep", args=[str(number), "y"], queue="telegram", producer=producer)
            while sum(1 for _ in client.scan_iter("celery-task-meta-*", count=1000)) < FLOOR_SLEEPS:
                time.sleep(0.05)
            rates.append(FLOOR_SLEEPS / (time.monotonic() - started))
            client.flushdb()
        peak_kib = memory_kib(floor_pid)[1]
    finally:
        stack.processes.pop("celery-floor").stop()
        client.flushdb()
    settings.results["celery_floor"] = {
        "round_trip_p50_ms": p50s,
        "round_trip_p95_ms": p95s,
        "sleep_rates": rates,
        "worker_ready_kib": ready_kib,
        "worker_peak_kib": peak_kib,
    }
    ideal = pool / PROVIDER_SECONDS
    rate = median(rates)
    return [
        Row("2 Test delivery", "Celery alone: no-op task round trip, 1 concurrent, median", "ms", median(p50s),
            note="in the overhead of every test; no delivery code removes it"),
        Row("2 Test delivery", "Celery alone: no-op task round trip, 1 concurrent, p95", "ms", median(p95s)),
        Row("3 Worker", f"Celery alone: 100 ms sleep tasks/s, pool {pool}", "msg/s", rate, ideal, rate / ideal,
            note="the most any delivery code could reach"),
        Row("4 Memory", f"Celery alone: worker peak RSS after {settings.runs * FLOOR_SLEEPS:,} sleep tasks", "MiB",
            peak_kib / 1024, check=f"{ready_kib / 1024:.1f} MiB when ready",
            note="its tasks import app.queues, so Flask, SQLAlchemy and Celery, but no provider"),
    ]  # fmt: skip


def _memory_row(who: str, samples: Sequence[tuple[int, int, int]], total: int, unit: str) -> Row:
    """Peak RSS at the end, and growth between the sample nearest half the total and the last one."""
    half = min(samples, key=lambda sample: abs(sample[0] - total / 2))
    end = samples[-1]
    growth_mib = (end[1] - half[1]) / 1024
    peak_mib = end[2] / 1024
    # "No growth" allows 1 MiB: the allocator's arenas move by that much on their own.
    met = peak_mib < 120 and growth_mib <= 1.0
    return Row(
        "4 Memory",
        f"{who} after {end[0]:,} {unit}",
        "MiB",
        peak_mib,
        check=f"RSS {half[1] / 1024:.1f} MiB at {half[0]:,}, {end[1] / 1024:.1f} MiB at {end[0]:,}: "
        f"growth {growth_mib:+.1f} MiB",
        target="peak < 120 MiB, no growth",
        met=met,
    )


# --- 4. The web process's memory ------------------------------------------------------------------------

MEMORY_REQUESTS = 10_000
MEMORY_HOSTS = 300


def web_memory(settings: Settings, stack: Stack) -> list[Row]:
    assert stack.database is not None
    hosts = seed.new_hosts(stack.jwt_secret, MEMORY_HOSTS)
    with stack.database.connect() as conn:
        seed.insert_hosts(conn, hosts, connectors_each=10)
    lines: list[Line] = []
    for host in hosts:
        lines.append(Line("GET", "/api/connectors", host.token))
        lines.append(Line("PUT", f"/api/connectors/{host.connector_ids[0]}", host.token, '{"name":"renamed {n}"}'))
    file = write_lines(settings.work / "memory.tsv", lines)

    web = stack.restart("web")
    master = _process_pid(web, "gunicorn")
    workers = [pid for pid in web.tree()[1:] if "gunicorn" in command_line(pid) and pid != master]
    samples: dict[int, list[tuple[int, int, int]]] = {pid: [] for pid in workers}
    served = 0
    statuses: dict[int, int] = {}
    while served < MEMORY_REQUESTS:
        result = wrk(stack.base_url, file, connections=CONNECTIONS, seconds=1)
        for status, count in result.statuses.items():
            statuses[status] = statuses.get(status, 0) + count
        served += result.requests
        for pid in workers:
            samples[pid].append((served, *memory_kib(pid)))
    settings.results["web memory"] = {"samples_kib": {str(pid): s for pid, s in samples.items()}, "statuses": statuses}
    # Each gunicorn process served about half; report the one that grew most.
    worst = max(workers, key=lambda pid: samples[pid][-1][2])
    row = _memory_row("web (gunicorn worker)", samples[worst], samples[worst][-1][0], "requests to the web")
    _, master_peak = memory_kib(master)
    others = ", ".join(f"{samples[pid][-1][2] / 1024:.1f}" for pid in workers)
    row.note = f"peaks of its workers {others} MiB; master {master_peak / 1024:.1f} MiB"
    if any(not 200 <= status < 300 for status in statuses):
        row.note += f"; answers {statuses}"
    return [row]


# --- 5. Scale --------------------------------------------------------------------------------------------

SMALL_HOSTS = 100  # x 10 connectors = 1,000
LARGE_HOSTS = 100_000  # x 10 = 1,000,000
SAMPLED_HOSTS = 500


def scale(settings: Settings, new_stack: Callable[[str], Stack]) -> list[Row]:
    """Two web processes alike but for their databases, 1,000 and 1,000,000 connectors; runs alternate."""
    small, large = new_stack("scale-1k"), new_stack("scale-1m")
    try:
        for stack in (small, large):
            stack.run_release()
            stack.start_web()
        assert small.database is not None and large.database is not None
        small_hosts = seed.new_hosts(small.jwt_secret, SMALL_HOSTS)
        with small.database.connect() as conn:
            seed.insert_hosts(conn, small_hosts, connectors_each=10)
            seed.analyze(conn)
        started = time.monotonic()
        with large.database.connect() as conn:
            added = seed.fill_table(conn, LARGE_HOSTS, connectors_each=10)
            seed.analyze(conn)
            total = conn.execute("SELECT count(*) FROM connectors").fetchone()
            conn.commit()
        rows_now = total[0] if total else 0
        settings.log(f"  filled a table with {rows_now:,} connectors in {time.monotonic() - started:.0f} s")
        sampled = [added[i * len(added) // SAMPLED_HOSTS] for i in range(SAMPLED_HOSTS)]
        targets = {
            "1k": (small, [Line("GET", "/api/connectors", host.token) for host in small_hosts]),
            "1m": (large, [Line("GET", "/api/connectors", seed.mint(large.jwt_secret, i)) for i in sampled]),
        }
        files = {name: write_lines(settings.work / f"scale-{name}.tsv", lines) for name, (_, lines) in targets.items()}
        runs: dict[str, list[WrkResult]] = {"1k": [], "1m": []}
        # A fast list outruns 100 requests a minute per Host at one connection: the limiter's counters (the
        # only keys in the scale stacks' Redis database) start afresh before every run, so no run meets a 429.
        limiter_store = redis.Redis.from_url(small.redis_url or "")
        for name, (stack, _) in targets.items():
            limiter_store.flushdb()
            wrk(stack.base_url, files[name], connections=1, seconds=1)
        for run in range(settings.runs):
            for name in ("1k", "1m") if run % 2 == 0 else ("1m", "1k"):
                stack = targets[name][0]
                limiter_store.flushdb()
                runs[name].append(wrk(stack.base_url, files[name], connections=1, seconds=settings.seconds))
    finally:
        small.stop()
        large.stop()

    rows = []
    for label, pick in (("median", lambda r: r.p50_ms), ("p95", lambda r: r.p95_ms)):
        small_value, large_value = median([pick(r) for r in runs["1k"]]), median([pick(r) for r in runs["1m"]])
        ratio = large_value / small_value
        rows.append(
            Row(
                "5 Scale",
                f"GET /api/connectors {label}, 1,000,000 rows (floor: 1,000 rows)",
                "ms",
                large_value,
                small_value,
                ratio,
                target="ratio < 1.3" if label == "median" else "(reported)",
                met=ratio < 1.3 if label == "median" else None,
                note=_clean(runs["1k"] + runs["1m"]),
            )
        )
    settings.results["scale"] = {
        f"{name}_{key}_ms": [getattr(r, f"{key}_ms") for r in results]
        for name, results in runs.items()
        for key in ("p50", "p95")
    }
    return rows
