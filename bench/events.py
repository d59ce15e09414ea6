"""The events' backlog: how fast the worker drains 5,000 undelivered events to a receiver that verifies them.

`python -m bench.events [--source DIR ...]` (PostgreSQL and Redis must answer, as `bench/run` makes sure). Each
run, for each tree given (`--source`, repeatable; the trees take turns from run to run, so that noise on this
shared machine falls on all of them):

1. a stack of the tree's own (`bench/stack.py`): a fresh PostgreSQL database migrated by the tree's `release`
   line, a Redis database of its own (`--redis-db`, flushed before and after), EVENTS_WEBHOOK_URL pointing at
   the receiver and a fresh EVENTS_WEBHOOK_SECRET, `APP_ENV=production`, `LOG_LEVEL=WARNING`;
2. EVENTS events written into the database with SQL, undelivered, as a receiver that was away leaves them;
3. the tree's `worker` and `beat` lines of the `Procfile` started (as configured: 50 threads, a sweep every
   15 s); once the worker answers a ping, one `events.deliver` job is sent, as the web sends one after a commit
   that wrote events; from then on the worker and beat do what they do in production;
4. the time from that job to the receiver's verified receipt of the last event: events a second.

Then, once per tree, where the time of one event goes: `python bench/events.py profile`, a process of the
tree's code, runs the delivery (`deliver_due`, as the job does) over PROFILE_EVENTS events of a fresh
database, timing the database work (`claim_next` and `record_try`), the post (`post_event`), the signature
(`Webhook.sign`), and counting statements, commits and pool checkouts (each a `pool_pre_ping` round trip).

The receiver (`python -m bench.events receiver`, its own process, asyncio) checks every Standard Webhooks
signature and counts duplicates (a `webhook-id` seen before), events out of order and the TCP connections it
accepted. Printed: events a second per run and their median per tree, what the receiver counted, and the
profile. A benchmark, not a test: nothing here fails on a number.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

EVENTS = 5000
PROFILE_EVENTS = 1000
RUNS = 3
REDIS_DB = 6  # one of the benchmarks' databases (BENCHMARKS.md): never one a test run uses
SEED = """
INSERT INTO events (type, host_id, data, created_at, tries)
SELECT 'connector.updated', host_id, json_build_object('host_id', host_id, 'connector_id', gen_random_uuid(),
       'connector_type', 'email', 'error_code', NULL, 'message', NULL),
       now() AT TIME ZONE 'utc' - interval '10 minutes' + n * interval '1 millisecond', 0
FROM generate_series(1, %(count)s) n CROSS JOIN LATERAL (SELECT gen_random_uuid() AS host_id) h
"""


# --- the receiver -------------------------------------------------------------------------------------------


class _Receiver:
    """Takes each event whose signature verifies (204), and keeps count of what a receiver would mind."""

    def __init__(self, secret: str, delay: float) -> None:
        from standardwebhooks import Webhook

        self.webhook = Webhook(secret)
        self.delay = delay
        self.reset()

    def reset(self) -> None:
        self.seen: set[str] = set()
        self.received = self.duplicates = self.out_of_order = self.refused = 0
        self.connections = 0  # that carried at least one event (the benchmark's own questions do not count)
        self.last_id = 0
        self.first_at: float | None = None
        self.last_at: float | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "refused": self.refused,
            "connections": self.connections,
            "first_at": self.first_at,
            "last_at": self.last_at,
        }

    async def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if path == "/bench/stats":
            return 200, json.dumps(self.stats()).encode()
        if path == "/bench/reset":
            self.reset()
            return 200, b"{}"
        if method != "POST":
            return 405, b"{}"
        from standardwebhooks import WebhookVerificationError

        try:
            self.webhook.verify(body, headers, json_parse=False)
        except WebhookVerificationError:
            self.refused += 1
            return 400, b'{"error": "bad signature"}'
        if self.delay:
            await asyncio.sleep(self.delay)
        webhook_id = headers["webhook-id"]
        if webhook_id in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(webhook_id)
            self.received += 1
            number = int(webhook_id.removeprefix("evt_"))
            if number < self.last_id:
                self.out_of_order += 1
            self.last_id = max(self.last_id, number)
            self.last_at = time.monotonic()
            self.first_at = self.first_at or self.last_at
        return 204, b""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        carried_events = False
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _version = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not carried_events and not path.startswith("/bench/"):
                    carried_events = True
                    self.connections += 1
                status, data = await self.answer(method, path, headers, body)
                kind = "Content-Type: application/json\r\n" if data else ""
                writer.write(f"HTTP/1.1 {status} X\r\n{kind}Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def run_receiver(delay: float) -> None:
    receiver = _Receiver(os.environ["BENCH_WEBHOOK_SECRET"], delay)
    server = await asyncio.start_server(receiver.serve, "127.0.0.1", 0, backlog=1024)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stopped.wait()


# --- where one event's time goes (run with the tree's code) --------------------------------------------------


def run_profile() -> None:
    """Deliver the backlog of the database in DATABASE_URL with this process's `app`, timing each part; print
    the result as JSON. The names timed exist in every tree measured so far."""
    from sqlalchemy import event
    from standardwebhooks import Webhook

    import app.events.service as service
    from app import create_app
    from app.extensions import db

    spent: Counter[str] = Counter()
    counts: Counter[str] = Counter()

    def timed(name: str, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
                counts[name] += 1

        return run

    service.claim_next = timed("database", service.claim_next)
    service.record_try = timed("database", service.record_try)
    service.post_event = timed("post", service.post_event)
    Webhook.sign = timed("signature", Webhook.sign)
    flask_app = create_app(env=dict(os.environ))
    with flask_app.app_context():
        engine = db.engine
        event.listen(engine, "before_cursor_execute", lambda *_: counts.update(["statement"]))
        event.listen(engine, "commit", lambda *_: counts.update(["commit"]))
        event.listen(engine.pool, "checkout", lambda *_: counts.update(["checkout"]))
        started = time.perf_counter()
        delivered = 0
        while sent := service.deliver_due():
            delivered += sent
        wall = time.perf_counter() - started
    print(json.dumps({"delivered": delivered, "seconds": wall, "spent": spent, "counts": counts}))


def _profile(tree: Path, logs: Path, receiver_url: str, secret: str, redis_db: int) -> dict[str, Any]:
    from bench.stack import Stack

    stack = Stack("events-profile", embedded=False, log_dir=logs, extra_env=_webhook_env(receiver_url, secret),
                  source=tree, redis_db=redis_db)  # fmt: skip
    try:
        stack.run_release()
        _seed(stack, PROFILE_EVENTS)
        env = {**stack.env, "PYTHONPATH": str(tree)}
        finished = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "profile"],
            cwd=tree, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if finished.returncode != 0:
            raise RuntimeError(f"the profile failed:\n{finished.stderr[-3000:]}")
        return json.loads(finished.stdout.strip().splitlines()[-1])
    finally:
        stack.stop()


# --- the drain ---------------------------------------------------------------------------------------------


def _webhook_env(receiver_url: str, secret: str) -> dict[str, str]:
    return {"EVENTS_WEBHOOK_URL": f"{receiver_url}/bapba/events", "EVENTS_WEBHOOK_SECRET": secret}


def _seed(stack: Any, count: int) -> None:
    assert stack.database is not None
    with stack.database.connect() as conn:
        conn.execute(SEED, {"count": count})
        conn.commit()
        conn.autocommit = True
        conn.execute("ANALYZE events")


def _stats(receiver_url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{receiver_url}/bench/stats", timeout=5).json()


def _drain(
    tree: Path, logs: Path, name: str, receiver_url: str, secret: str, count: int, redis_db: int
) -> dict[str, Any]:
    """One run: the tree's stack, a backlog of `count`, one job; the time to the receipt of the last event."""
    import httpx

    from bench.stack import Stack, wait_until

    stack = Stack(name, embedded=False, log_dir=logs, extra_env=_webhook_env(receiver_url, secret), source=tree,
                  redis_db=redis_db)  # fmt: skip
    try:
        stack.run_release()
        _seed(stack, count)
        httpx.post(f"{receiver_url}/bench/reset", timeout=5)
        worker = stack.start_worker()
        stack.start("beat")
        started = time.monotonic()
        stack.celery().send_task("events.deliver", queue="dispatch")
        wait_until(
            lambda: _stats(receiver_url)["received"] >= count,
            seconds=max(300.0, count / 5),
            what=f"the receiver to verify {count:,} events",
            process=worker,
        )
        time.sleep(0.5)  # any second post of the last ones
        stats = _stats(receiver_url)
        assert stack.database is not None
        with stack.database.connect() as conn:
            left = conn.execute("SELECT count(*) FROM events WHERE delivered_at IS NULL").fetchone()[0]
    finally:
        stack.stop()
    seconds = stats["last_at"] - started
    return {**stats, "seconds": seconds, "per_second": count / seconds, "undelivered": left}


def _start_receiver(logs: Path, secret: str) -> tuple[Any, str]:
    from bench.stack import ROOT, Process, wait_until

    receiver = Process("receiver", [sys.executable, "-m", "bench.events", "receiver"],
                       {**os.environ, "BENCH_WEBHOOK_SECRET": secret}, ROOT, logs)  # fmt: skip
    wait_until(lambda: b"READY " in receiver.log_path.read_bytes(), seconds=30, what="the receiver", process=receiver)
    port = int(receiver.log_path.read_text().split("READY ", 1)[1].split()[0])
    return receiver, f"http://127.0.0.1:{port}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["receiver"]:
        asyncio.run(run_receiver(float(argv[1]) if len(argv) > 1 else 0.0))
        return 0
    if argv[:1] == ["profile"]:
        run_profile()
        return 0
    from bench.stack import ROOT

    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, action="append", help="a checkout to measure (repeatable)")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs per tree; the table shows medians")
    parser.add_argument("--events", type=int, default=EVENTS, help="the backlog of one run")
    parser.add_argument("--redis-db", type=int, default=REDIS_DB, help="the Redis database the stacks use")
    parser.add_argument("--no-profile", action="store_true", help="skip where one event's time goes")
    parser.add_argument("--output", type=Path, help="write every run's numbers here as JSON")
    args = parser.parse_args(argv)
    trees = [tree.resolve() for tree in (args.source or [ROOT])]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(f"stopped by signal {signum}"))
    logs = Path(tempfile.mkdtemp(prefix="bench-events-"))
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    receiver, receiver_url = _start_receiver(logs, secret)
    runs: dict[str, list[dict[str, Any]]] = {str(tree): [] for tree in trees}
    profiles: dict[str, dict[str, Any]] = {}
    log(f"logs: {logs}")
    try:
        for run in range(args.runs):
            for index, tree in enumerate(trees):
                log(
                    f"run {run + 1}/{args.runs}, {tree}: {args.events:,} events [load average {os.getloadavg()[0]:.1f}]"
                )
                result = _drain(tree, logs, f"events-{index}-{run}", receiver_url, secret, args.events, args.redis_db)
                log(f"  {result['per_second']:,.1f} events/s ({result['seconds']:.1f} s)")
                runs[str(tree)].append(result)
        if not args.no_profile:
            for tree in trees:
                log(f"profile, {tree}: {PROFILE_EVENTS:,} events")
                profiles[str(tree)] = _profile(tree, logs, receiver_url, secret, args.redis_db)
    finally:
        receiver.stop()

    print(f"\n{args.events:,} events a run, {args.runs} runs a tree, trees alternating")
    print("tree | events/s, median | each run | duplicates | out of order | refused | connections | undelivered")
    for tree, results in runs.items():
        if not results:
            continue
        rates = [r["per_second"] for r in results]
        print(
            f"{tree} | {statistics.median(rates):,.1f} | {', '.join(f'{rate:,.1f}' for rate in rates)} | "
            f"{sum(r['duplicates'] for r in results)} | {sum(r['out_of_order'] for r in results)} | "
            f"{sum(r['refused'] for r in results)} | {', '.join(str(r['connections']) for r in results)} | "
            f"{sum(r['undelivered'] for r in results)}"
        )
    if profiles:
        print(f"\nwhere one event's time goes ({PROFILE_EVENTS:,} events, one process, no Celery):")
        print("tree | events/s | ms per event: database, post, of which signature, rest | statements | commits "
              "| pool checkouts (per event)")  # fmt: skip
        for tree, profile in profiles.items():
            n = profile["delivered"] or 1
            spent, counts = profile["spent"], profile["counts"]
            rest = profile["seconds"] - spent.get("database", 0) - spent.get("post", 0)
            print(
                f"{tree} | {n / profile['seconds']:,.1f} | {spent.get('database', 0) / n * 1000:.2f}, "
                f"{spent.get('post', 0) / n * 1000:.2f}, {spent.get('signature', 0) / n * 1000:.3f}, "
                f"{rest / n * 1000:.2f} | {counts.get('statement', 0) / n:.1f} | {counts.get('commit', 0) / n:.1f} | "
                f"{counts.get('checkout', 0) / n:.1f}"
            )
    if args.output:
        args.output.write_text(json.dumps({"runs": runs, "profiles": profiles}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
