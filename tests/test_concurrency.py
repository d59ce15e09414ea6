"""Concurrency: simultaneous creates, deletes, rate-limited calls, trust-store builds and config changes."""

from __future__ import annotations

import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.channels import base
from tests.conftest import config_for, create_connector, new_host, service_headers
from tests.support import send_test


def _concurrently(count: int, call):  # noqa: ANN001, ANN202
    barrier = threading.Barrier(count)

    def run(index: int):  # noqa: ANN202
        barrier.wait()
        return call(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_creates_of_one_type_and_name_give_one_201_and_the_rest_409(client):
    hosts = [new_host() for _ in range(2)]
    body = {"type": "email", "name": "Same", "config": config_for("email")}
    statuses = _concurrently(
        20, lambda i: client.post("/api/connectors", json=body, headers=hosts[i % 2].headers).status_code
    )
    assert sorted(statuses) == [201, 201] + [409] * 18


def test_concurrent_deletes_of_the_last_two_connectors_never_leave_none_while_the_will_is_active(client):
    for _ in range(8):
        host = new_host()
        ids = [create_connector(client, host, kind)["id"] for kind in ("email", "sms")]
        assert (
            client.put(
                f"/api/internal/hosts/{host.id}/will", json={"active": True}, headers=service_headers()
            ).status_code
            == 200
        )
        paths = [f"/api/connectors/{connector_id}" for connector_id in ids]
        headers = host.headers
        statuses = _concurrently(
            2, lambda i, paths=paths, headers=headers: client.delete(paths[i], headers=headers).status_code
        )
        assert sorted(statuses) == [204, 409]
        assert len(client.get("/api/connectors", headers=host.headers).get_json()["connectors"]) == 1


def test_rate_limit_holds_under_concurrency(client):
    host = new_host()
    statuses = _concurrently(
        50,
        lambda i: (
            client.post(
                "/api/connectors",
                json={"type": "email", "name": f"n{i}", "config": config_for("email")},
                headers=host.headers,
            ).status_code
        ),
    )
    assert statuses.count(201) == 10
    assert statuses.count(429) == 40


def test_a_worker_pool_starting_together_builds_one_trust_store(monkeypatch):
    # Each context is ~0.9 MiB held by the thread's HTTP client; fifty threads used to build up to fifty.
    monkeypatch.setattr(base, "_tls", None)
    contexts = _concurrently(16, lambda _: base.tls_context())
    assert len({id(context) for context in contexts}) == 1
    assert contexts[0].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.usefixtures("worker")
def test_a_verdict_on_a_config_replaced_meanwhile_does_not_verify_the_new_one(client, host, peers):
    connector = create_connector(client, host, "telegram", peers=peers)
    peers.telegram.delay = 0.6
    answer: dict = {}
    sending = threading.Thread(target=lambda: answer.update(r=send_test(client, host, connector["id"], "123456789")))
    sending.start()
    time.sleep(0.3)
    replaced = client.put(
        f"/api/connectors/{connector['id']}",
        json={"config": config_for("telegram", bot_token="7012345678:AAHanotherTokenAAAAAAAAAAAAAAAAAAAA")},
        headers=host.headers,
    )
    assert replaced.status_code == 200
    sending.join(timeout=10)
    assert answer["r"].status_code == 200  # the old config worked...
    listed = client.get("/api/connectors", headers=host.headers).get_json()["connectors"][0]
    assert listed["is_verified"] is False  # ...which says nothing about the new one
