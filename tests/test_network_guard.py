"""Server-side request forgery: private and loopback destinations are refused, at save and at send."""

from __future__ import annotations

import socket

import pytest

from app.channels.base import DeliveryError, ProviderSettings
from app.channels.email import EmailProvider
from app.channels.netguard import literal_host_blocked
from app.deliveries.jobs import TEST_MESSAGE
from tests.conftest import USES_REDIS, config_for, create_connector
from tests.support import closed_port, send_test


@pytest.fixture
def private_destinations_refused(app):
    app.config["ALLOW_PRIVATE_DESTINATIONS"] = False
    yield
    app.config["ALLOW_PRIVATE_DESTINATIONS"] = True


REFUSED_HOSTS = [
    "localhost", "LOCALHOST", "mail.localhost", "127.0.0.1", "127.1.2.3", "10.0.0.5", "172.16.3.4", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "::1", "[::1]", "::", "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "fec0::1", "2002:a9fe:a9fe::1", "2002:7f00:1::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
]  # fmt: skip


@pytest.mark.parametrize("address", REFUSED_HOSTS)
def test_literal_private_addresses_are_refused(address):
    assert literal_host_blocked(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888", "smtp.example.com", "1.1.1.1"])
def test_public_addresses_and_names_pass_the_literal_check(address):
    assert not literal_host_blocked(address)


@pytest.mark.usefixtures("private_destinations_refused")
@pytest.mark.parametrize("address", ["localhost", "127.0.0.1", "169.254.169.254", "::1", "10.1.2.3", "fd00::1"])
def test_create_and_update_refuse_private_smtp_hosts_with_400(client, host, address):
    body = {"type": "email", "name": "x", "config": config_for("email", smtp_host=address)}
    refused = client.post("/api/connectors", json=body, headers=host.headers)
    assert refused.status_code == 400
    assert "smtp_host" in refused.get_json()["errors"]["json"]["config"]

    created = create_connector(client, host, "email", "public")
    update = client.put(
        f"/api/connectors/{created['id']}",
        json={"config": config_for("email", smtp_host=address)},
        headers=host.headers,
    )
    assert update.status_code == 400


@pytest.mark.usefixtures("worker")
def test_a_name_resolving_to_a_private_address_is_502_destination_blocked_whether_or_not_it_listens(
    app, client, host, peers
):
    if USES_REDIS:
        pytest.skip("the rule is read by the worker; the subprocess worker of this run allows private addresses")
    ids = []
    for name, port in (("listening", peers.smtp.port), ("closed", closed_port())):
        config = config_for("email", peers, smtp_host="localhost", smtp_port=port)
        created = client.post(
            "/api/connectors", json={"type": "email", "name": name, "config": config}, headers=host.headers
        )
        ids.append(created.get_json()["id"])
    app.config["ALLOW_PRIVATE_DESTINATIONS"] = False
    try:
        answers = [send_test(client, host, connector_id).get_json() for connector_id in ids]
    finally:
        app.config["ALLOW_PRIVATE_DESTINATIONS"] = True
    assert [a["error_code"] for a in answers] == ["destination_blocked", "destination_blocked"]
    assert answers[0]["message"] == answers[1]["message"]  # nothing tells an open port from a closed one
    assert peers.smtp.received == []


def test_the_smtp_host_is_resolved_once_and_the_checked_address_is_used(peers, monkeypatch):
    calls: list[str] = []
    real = socket.getaddrinfo

    def resolver(host, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(host)
        return real("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    provider = EmailProvider(ProviderSettings(timeout=2, allow_private=True))
    config = {**config_for("email", peers), "smtp_host": "mail.example.test"}
    provider.send(config, "survivor@example.org", TEST_MESSAGE)
    assert calls == ["mail.example.test"]
    assert len(peers.smtp.wait_for(1)) == 1

    blocked = EmailProvider(ProviderSettings(timeout=2, allow_private=False))
    with pytest.raises(DeliveryError) as raised:
        blocked.send(config, "survivor@example.org", TEST_MESSAGE)
    assert raised.value.code == "destination_blocked"
    assert len(peers.smtp.received) == 1
