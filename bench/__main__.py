"""`python -m bench`: start what the figures need, measure them, stop everything, print the table.

bench/run is the documented entry point: it makes sure PostgreSQL, Redis and wrk are there, then runs this.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from bench import dispatch, figures, waiting
from bench.figures import Row, Settings
from bench.stack import REDIS_DB, ROOT, Stack, start_peer

FIGURES = ("crud", "test", "worker", "memory", "dispatch", "scale", "embedded", "waiting")


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return f"{os.cpu_count()} cores, {cpu}, {memory_kib / 1024 / 1024:.0f} GiB, {platform.platform()}"


def table(rows: list[Row]) -> str:
    header = ("figure", "measure", "service", "floor", "ratio", "checked", "target", "met", "note")
    body = []
    for row in rows:
        floor = "" if row.floor is None else f"{row.floor:,.1f}"
        body.append(
            (
                row.figure,
                row.measure,
                f"{row.service:,.1f} {row.unit}",
                floor and f"{floor} {row.unit}",
                "" if row.ratio is None else f"{row.ratio:.2f}",
                row.check,
                row.target,
                {True: "yes", False: "NO", None: ""}[row.met],
                row.note,
            )
        )
    widths = [max(len(str(cells[i])) for cells in (header, *body)) for i in range(len(header))]
    lines = [
        " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True))
        for cells in (header, *body)
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement; the table shows medians")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one wrk run")
    parser.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated subset of {','.join(FIGURES)}")
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout whose Procfile and code to run")
    parser.add_argument("--output", type=Path, help="write the rows and every run's numbers here as JSON")
    args = parser.parse_args(argv)
    chosen = {name.strip() for name in args.only.split(",") if name.strip()}
    if unknown := chosen - set(FIGURES):
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk); bench/run installs it")

    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    logs = work / "logs"
    logs.mkdir()

    loads: list[tuple[str, float]] = []

    def log(message: str) -> None:
        # A figure's first line (a digit, a dot) also shows the machine's load: others share its two cores.
        if message[:1].isdigit() and message[1:2] == ".":
            load = os.getloadavg()[0]
            loads.append((message.split(":")[0], load))
            message = f"{message} [load average {load:.1f}]"
        print(message, file=sys.stderr, flush=True)

    source = args.source.resolve()
    settings = Settings(runs=args.runs, seconds=args.seconds, work=work, log=log)
    rows: list[Row] = []
    started = time.monotonic()
    log(f"machine: {machine()}\nlogs and request files: {work}")
    with ExitStack() as cleanup:
        smtp, smtp_port = start_peer("smtp", logs)
        cleanup.callback(smtp.stop)
        telegram, telegram_port = start_peer("telegram", logs, "--delay", str(figures.PROVIDER_SECONDS))
        cleanup.callback(telegram.stop)

        if chosen & {"crud", "test", "worker", "memory", "dispatch"}:
            log("starting PostgreSQL + Redis stack (release, web, worker)")
            stack = Stack(
                "postgres-redis",
                embedded=False,
                log_dir=logs,
                extra_env={"TELEGRAM_API_BASE_URL": f"http://127.0.0.1:{telegram_port}"},
                source=source,
            )
            cleanup.callback(stack.stop)
            stack.run_release()
            stack.start_web()
            stack.start_worker()
            pool = int(stack.env.get("WORKER_CONCURRENCY", "50"))
            if "crud" in chosen:
                log("1. CRUD against the bare Flask floor")
                rows += figures.crud(settings, stack)
            if "test" in chosen:
                log("2. test delivery overhead, Redis transport")
                rows += figures.test_delivery(settings, stack, smtp_port, "Redis", target_ms=5)
            if chosen & {"worker", "memory"}:
                log("3. worker throughput (and 4. its memory)")
                rows += figures.worker(settings, stack, pool)
            if chosen & {"test", "worker"}:
                log("2. and 3. the Celery floor: Celery alone, as the service runs it")
                rows += figures.celery_floor(settings, stack, pool)
            if "memory" in chosen:
                log("4. web memory")
                rows += figures.web_memory(settings, stack)
            if "dispatch" in chosen:
                log("6. dispatch: OTP latency to the Telegram peer, and messages a second through one worker")
                rows += dispatch.dispatch(settings, stack, f"http://127.0.0.1:{telegram_port}", pool)
            stack.stop()

        if "scale" in chosen:
            log("5. scale: 1,000 and 1,000,000 connectors")

            def scale_stack(name: str) -> Stack:
                # Its own Redis database: the figures' stacks must not flush each other's.
                stack = Stack(name, embedded=False, log_dir=logs, extra_env={}, source=source, redis_db=REDIS_DB + 1)
                cleanup.callback(stack.stop)
                return stack

            rows += figures.scale(settings, scale_stack)

        if "embedded" in chosen:
            log("2. test delivery overhead, embedded transport (SQLite, filesystem broker)")
            embedded = Stack("embedded", embedded=True, log_dir=logs, extra_env={}, source=source)
            cleanup.callback(embedded.stop)
            embedded.run_release()
            embedded.start_web()
            embedded.start_worker()
            rows += figures.test_delivery(settings, embedded, smtp_port, "embedded", target_ms=50)
            embedded.stop()

        if "waiting" in chosen:
            log("7. waiting: lists beside 100 tests on a tarpit SMTP server, gthread and gevent")
            if not waiting.gevent_installed():
                log("  gevent is not installed: gthread variants only (.venv/bin/pip install gevent to add them)")
            tarpit, tarpit_port = start_peer("tarpit", logs)
            cleanup.callback(tarpit.stop)
            rows += waiting.waiting(settings, logs, source, tarpit_port, smtp_port)

    rows.sort(key=lambda row: row.figure)
    print(f"\nmachine: {machine()}")
    wall = time.monotonic() - started
    print(f"runs per measurement: {args.runs}, wrk run: {args.seconds:g} s, wall time {wall:.0f} s")
    if loads:
        values = [load for _, load in loads]
        print(f"1-minute load average when each figure began: {min(values):.1f} to {max(values):.1f} (2 cores)")
    print()
    print(table(rows))
    if args.output:
        report = {
            "machine": machine(),
            "load_averages": loads,
            "rows": [row.__dict__ for row in rows],
            "runs": settings.results,
        }
        args.output.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
