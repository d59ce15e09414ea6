"""Figure 6, dispatch: an OTP from `POST /api/internal/hosts/{id}/messages` to the provider peer's receipt, and
messages a second through one worker when the peer takes 100 ms; each against Celery alone doing dispatch's
two hops (see `bench/celery_floor.py`), in the same run, runs alternating.

Latency is taken from just before the POST is sent to the moment the Telegram peer has read the sendMessage
request, before its own 100 ms: so the peer's time is not in it. Both are `time.monotonic()`, one clock for
every process of the machine. Throughput: the worker is stopped, a batch of messages is posted (their advance
jobs wait on the broker), the worker is started, and the rate is taken between the 10th and the 90th
percentile of the peer's receipts, as figure 3 does with `finished_at`. Celery beat is not run: its sweep
would only re-queue what is waiting.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import redis
from celery import Celery

from bench import seed
from bench.figures import (
    TELEGRAM_CHAT,
    TELEGRAM_CONFIG,
    Row,
    Settings,
    start_floor_worker,
)
from bench.load import median
from bench.peers import TELEGRAM_TOKEN, receipt_text
from bench.stack import REDIS_DB, Stack

CONCURRENCIES = (1, 8)
WARMUP_MESSAGES = 20
WARMUP_BATCH = 200
MAX_BATCH = 2_000
FLOOR_BATCH = 2_000
BATCH_SECONDS = 20.0
POST_THREADS = 16
DISPATCH_QUEUE = "dispatch"


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def _result_keys(store: redis.Redis) -> int:
    return sum(1 for _ in store.scan_iter("celery-task-meta-*", count=1000))


def _steady_rate(times: Sequence[float]) -> float:
    """Messages a second between the 10th and the 90th percentile of receipts: start-up and drain aside."""
    ordered = sorted(times)
    low, high = len(ordered) // 10, (len(ordered) * 9) // 10
    return (high - low) / (ordered[high] - ordered[low])


class _Clients:
    """One thread's HTTP clients: to the web process and to the peer."""

    def __init__(self, web_url: str, peer_url: str) -> None:
        self.web = httpx.Client(base_url=web_url, timeout=30)
        self.peer = httpx.Client(base_url=peer_url, timeout=40)

    def close(self) -> None:
        self.web.close()
        self.peer.close()

    def receipt(self, key: str) -> float | None:
        answer = self.peer.get(f"/bench/receipt/{key}", params={"timeout": 30})
        return float(answer.json()["at"]) if answer.status_code == 200 else None


class _Service:
    def __init__(self, stack: Stack, host_id: uuid.UUID) -> None:
        self.path = f"/api/internal/hosts/{host_id}/messages"
        self.auth = f"Bearer {seed.mint_service(stack.jwt_secret)}"
        self.unexpected: dict[str, int] = {}

    def post(self, clients: _Clients, key: str) -> bool:
        body = {"purpose": "otp", "recipient": {"telegram_chat_id": TELEGRAM_CHAT}, "text": receipt_text(key)}
        answer = clients.web.post(self.path, json=body, headers={"Authorization": self.auth, "Idempotency-Key": key})
        if answer.status_code != 202:
            label = f"{answer.status_code} {answer.text[:120]}"
            self.unexpected[label] = self.unexpected.get(label, 0) + 1
            return False
        return True

    def one(self, clients: _Clients, key: str) -> float | None:
        started = time.monotonic()
        if not self.post(clients, key):
            return None
        at = clients.receipt(key)
        return None if at is None else (at - started) * 1000


class _Floor:
    def __init__(self, celery: Celery, connector_id: uuid.UUID, peer_url: str) -> None:
        self.celery = celery
        self.connector_id = str(connector_id)
        self.peer_url = peer_url

    def args(self, key: str) -> list[Any]:
        return [key, self.connector_id, 1, self.peer_url, TELEGRAM_TOKEN, TELEGRAM_CHAT, receipt_text(key)]

    def one(self, clients: _Clients, key: str) -> float | None:
        started = time.monotonic()
        self.celery.send_task("floor.dispatch", args=self.args(key), queue=DISPATCH_QUEUE)
        at = clients.receipt(key)
        return None if at is None else (at - started) * 1000


def _closed_loop(
    web_url: str, peer_url: str, concurrency: int, seconds: float, prefix: str, one: Callable[[_Clients, str], Any]
) -> tuple[list[float], int]:
    """`concurrency` callers, each sending its next message once its last one reached the peer."""
    stop = time.monotonic() + seconds

    def caller(number: int) -> tuple[list[float], int]:
        clients = _Clients(web_url, peer_url)
        latencies, lost, sent = [], 0, 0
        try:
            while time.monotonic() < stop:
                value = one(clients, f"{prefix}-{number}-{sent}")
                sent += 1
                if value is None:
                    lost += 1
                else:
                    latencies.append(value)
        finally:
            clients.close()
        return latencies, lost

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(caller, range(concurrency)))
    return [value for latencies, _ in results for value in latencies], sum(lost for _, lost in results)


def _take_receipts(peer: httpx.Client, prefix: str, count: int, seconds: float) -> tuple[list[float], int]:
    """Wait until `count` messages whose key starts with `prefix` reached the peer; their receipt times."""
    deadline = time.monotonic() + seconds
    while True:
        answer = peer.get("/bench/receipts", params={"prefix": prefix, "keep": "1"}).json()
        if len(answer["receipts"]) >= count:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(answer['receipts'])} of {count} messages {prefix}* reached the peer")
        time.sleep(0.5)
    answer = peer.get("/bench/receipts", params={"prefix": prefix}).json()
    return list(answer["receipts"].values()), int(answer["duplicates"])


def dispatch(settings: Settings, stack: Stack, peer_url: str, pool: int) -> list[Row]:
    assert stack.database is not None and stack.redis_url is not None
    host = seed.new_hosts(stack.jwt_secret, 1)
    seed.api_create(stack.base_url, host, {"type": "telegram", "name": "otp bot", "config": TELEGRAM_CONFIG})
    service = _Service(stack, host[0].id)
    floor_redis = f"{stack.redis_url.rsplit('/', 1)[0]}/{REDIS_DB + 2}"
    store = redis.Redis.from_url(floor_redis)
    store.flushdb()
    _, celery = start_floor_worker(stack, floor_redis)
    floor = _Floor(celery, host[0].connector_ids[0], peer_url)
    results: dict[str, Any] = {}
    rows: list[Row] = []
    service_store = redis.Redis.from_url(stack.redis_url)
    keys_before = _result_keys(service_store)
    try:
        # -- latency: closed loops at 1 and 8 callers, service and floor alternating
        for name, sender in (("service", service), ("floor", floor)):
            _closed_loop(stack.base_url, peer_url, 4, 1.0, f"warm-{name}", sender.one)
        for concurrency in CONCURRENCIES:
            runs: dict[str, list[tuple[float, float, int, int]]] = {"service": [], "floor": []}
            for run in range(settings.runs):
                order = [("service", service), ("floor", floor)]
                for name, sender in order if run % 2 == 0 else reversed(order):
                    prefix = f"lat{concurrency}-{name}-{run}"
                    latencies, lost = _closed_loop(
                        stack.base_url, peer_url, concurrency, settings.seconds, prefix, sender.one
                    )
                    if not latencies:
                        raise RuntimeError(f"no {name} message reached the peer; see {stack.log_dir}")
                    runs[name].append(
                        (median(latencies), _percentile(latencies, 0.95), len(latencies), lost)
                    )  # fmt: skip
            results[f"latency c={concurrency}"] = runs
            for label, index in (("median", 0), ("p95", 1)):
                value = median([r[index] for r in runs["service"]])
                base = median([r[index] for r in runs["floor"]])
                lost = sum(r[3] for r in runs["service"]) + sum(r[3] for r in runs["floor"])
                rows.append(
                    Row(
                        "6 Dispatch",
                        f"OTP POST to peer receipt, Redis, {concurrency} concurrent, {label}",
                        "ms",
                        value,
                        base,
                        value / base,
                        check=f"overhead {value - base:+.1f} ms",
                        target="(reported)",
                        note="; ".join(
                            part
                            for part in (
                                f"{median([r[2] for r in runs['service']]) / settings.seconds:.0f} msg/s"
                                if label == "median"
                                else "",
                                f"{lost} never reached the peer" if lost else "",
                                f"answers {service.unexpected}" if service.unexpected else "",
                            )
                            if part
                        ),
                    )
                )
            settings.log(
                f"  {concurrency} concurrent: p50 {rows[-2].service:.1f} ms against {rows[-2].floor:.1f} ms, "
                f"p95 {rows[-1].service:.1f} ms against {rows[-1].floor:.1f} ms"
            )

        # -- throughput through one worker, the peer taking 100 ms
        peer = httpx.Client(base_url=peer_url, timeout=10)
        post_rates: list[float] = []
        duplicates = 0

        def service_batch(tag: str, count: int) -> float:
            stack.processes.pop("worker").stop()
            clients = [_Clients(stack.base_url, peer_url) for _ in range(POST_THREADS)]
            started = time.monotonic()
            try:
                with ThreadPoolExecutor(POST_THREADS) as threads:
                    posted = sum(
                        threads.map(
                            lambda i: sum(
                                service.post(clients[i], f"{tag}-{n}") for n in range(i, count, POST_THREADS)
                            ),
                            range(POST_THREADS),
                        )
                    )
            finally:
                for client in clients:
                    client.close()
            post_rates.append(posted / (time.monotonic() - started))
            stack.start_worker()
            times, dup = _take_receipts(peer, f"{tag}-", posted, 120 + posted / 5)
            nonlocal duplicates
            duplicates += dup
            rate = _steady_rate(times)
            settings.log(f"  batch {tag}: {posted} messages, {rate:.0f}/s (posted at {post_rates[-1]:.0f}/s)")
            return rate

        def floor_batch(tag: str, count: int) -> float:
            with celery.producer_or_acquire() as producer:
                for number in range(count):
                    key = f"{tag}-{number}"
                    celery.send_task("floor.dispatch", args=floor.args(key), queue=DISPATCH_QUEUE, producer=producer)
            times, _ = _take_receipts(peer, f"{tag}-", count, 120 + count / 5)
            rate = _steady_rate(times)
            settings.log(f"  floor batch {tag}: {count} messages, {rate:.0f}/s")
            return rate

        try:
            warm_rate = service_batch("thr-warm", WARMUP_BATCH)
            floor_batch("thr-floor-warm", WARMUP_BATCH)
            size = max(WARMUP_BATCH, min(MAX_BATCH, int(warm_rate * BATCH_SECONDS)))
            rates: dict[str, list[float]] = {"service": [], "floor": []}
            for run in range(settings.runs):
                steps = ("service", "floor") if run % 2 == 0 else ("floor", "service")
                for step in steps:
                    if step == "service":
                        rates["service"].append(service_batch(f"thr-{run}", size))
                    else:
                        rates["floor"].append(floor_batch(f"thr-floor-{run}", FLOOR_BATCH))
        finally:
            peer.close()
        results["throughput"] = {**rates, "post_rates": post_rates, "batch": size, "duplicates": duplicates}
        with stack.database.connect() as conn:
            statuses = dict(conn.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall())
        results["message_statuses"] = statuses
        result_keys = _result_keys(service_store) - keys_before
        results["service_result_keys"] = result_keys
        total_messages = sum(statuses.values())
        rate, base = median(rates["service"]), median(rates["floor"])
        ideal = pool / 0.1
        sleep_floor = settings.results.get("celery_floor", {}).get("sleep_rates")
        notes = [f"{rate / ideal:.2f} of the ideal {ideal:.0f}/s"]
        if sleep_floor:
            notes.append(
                f"{rate / median(sleep_floor):.2f} of Celery alone's 100 ms sleep tasks ({median(sleep_floor):.0f}/s)"
            )
        notes.append(f"batches of {size}, posted at {median(post_rates):.0f}/s with the worker stopped")
        if duplicates:
            notes.append(f"{duplicates} sent twice")
        failed = {status: count for status, count in statuses.items() if status != "delivered"}
        if failed:
            notes.append(f"messages not delivered: {failed}")
        notes.append(f"{result_keys / total_messages:.1f} task results kept in Redis per message")
        rows.append(
            Row(
                "6 Dispatch",
                f"messages/s through one worker, pool {pool}, peer 100 ms (floor: Celery alone, two hops)",
                "msg/s",
                rate,
                base,
                rate / base,
                target="(reported)",
                note="; ".join(notes),
            )
        )
        settings.log(f"  throughput: {rate:.0f} msg/s against {base:.0f} msg/s ({rate / base:.2f})")
    finally:
        stack.processes.pop("celery-floor").stop()
        store.flushdb()
    settings.results["dispatch"] = results
    return rows
