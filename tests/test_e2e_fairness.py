"""Fair under a flood, through the Procfile's processes on PostgreSQL and Redis (tests/e2e_stack.py): while one
Host's 2,000 notifications drain, another Host's one-time codes reach the provider within seconds."""

from __future__ import annotations

import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests import e2e_stack
from tests.conftest import config_for
from tests.e2e_stack import new_host, service_headers

pytestmark = pytest.mark.e2e
e2e_peers, providers, stack = e2e_stack.e2e_peers, e2e_stack.providers, e2e_stack.stack

# The flood is let through the API (each Host's limit is DISPATCH_LIMIT); the worker has its usual threads.
STACK_ENV = {"DISPATCH_LIMIT": "100000 per minute", "WORKER_CONCURRENCY": "8"}
FLOOD = 2000
OTPS = 10


# Measured on PostgreSQL and Redis, as production runs.
@pytest.mark.parametrize("stack", ["postgres_redis"], indirect=True)
def test_one_hosts_flood_of_notifications_does_not_delay_another_hosts_one_time_codes(stack, providers):
    flooding, waiting = new_host(), new_host()
    stack.create(flooding, "telegram", config_for("telegram", providers))
    stack.create(waiting, "telegram", config_for("telegram", providers))
    providers.telegram.delay = 0.2  # a provider call takes a while, as a real one does: the flood backs up

    def post(host_id: uuid.UUID, purpose: str, text: str) -> int:
        headers = {**service_headers(), "Idempotency-Key": uuid.uuid4().hex}
        body = {"purpose": purpose, "recipient": {"telegram_chat_id": "123456789"}, "text": text}
        return stack.request("POST", f"/api/internal/hosts/{host_id}/messages", json=body, headers=headers).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda n: post(flooding.id, "notification", f"notification {n}"), range(FLOOD)))
    assert codes == [202] * FLOOD

    def arrived(text: str) -> bool:
        return any(item["text"] == text for item in list(providers.telegram.received))

    latencies: list[float] = []
    for n in range(OTPS):
        text = f"Your code is {100000 + n}"
        started = time.monotonic()
        assert post(waiting.id, "otp", text) == 202
        while not arrived(text):
            assert time.monotonic() - started < 60, f"OTP {n} never reached the provider"
            time.sleep(0.01)
        latencies.append(time.monotonic() - started)
        time.sleep(0.3)
    delivered_so_far = sum(1 for item in list(providers.telegram.received) if item["text"].startswith("notification"))
    assert delivered_so_far < FLOOD, "the flood had drained before the codes were sent: nothing was measured"
    assert statistics.median(latencies) < 2.0, latencies
