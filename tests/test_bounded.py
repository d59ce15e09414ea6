"""Bounded provider calls: one total deadline per call (DNS included), a cap on what is read, and an answer that
cannot be read after the request went out counted as 'may have gone', never tried again through that connector."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.channels.base import DeliveryError, ProviderSettings
from app.channels.email import EmailProvider
from app.channels.sms import TwilioSmsProvider
from app.channels.telegram import TelegramProvider
from app.channels.whatsapp import WhatsAppProvider
from app.deliveries.jobs import TEST_MESSAGE
from tests.conftest import TEST_DATABASE_URL, USES_REDIS, _start_worker_subprocess, config_for, create_connector
from tests.support import DESTINATIONS, send_test, sibling_app, wait_for_worker
from tests.test_dispatch import dispatch, message, sweep, wait_final

pytestmark = pytest.mark.usefixtures("worker")

HTTP_KINDS = ["sms", "whatsapp", "telegram"]


def peer_of(peers: Any, kind: str) -> Any:
    return {"sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram, "email": peers.smtp}[kind]


def hung_up_within(peer: Any, seconds: float, wait: float = 10) -> list[float]:
    """When the client hung up on the peer's answer, once it has."""
    deadline = time.monotonic() + wait
    while not peer.gave_up_after and time.monotonic() < deadline:
        time.sleep(0.05)
    assert peer.gave_up_after and peer.gave_up_after[0] <= seconds, peer.gave_up_after
    return peer.gave_up_after


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_an_answer_dripped_a_byte_at_a_time_is_cut_at_the_deadline(app, client, host, peers, kind):
    connector = create_connector(client, host, kind, peers=peers)
    peer_of(peers, kind).mode = "drip"
    answer = send_test(client, host, connector["id"], DESTINATIONS[kind]).get_json()
    assert answer["error_code"] == "provider_unreachable", answer
    assert answer["message"].endswith("the provider may have accepted the message"), answer
    timeout = app.config["PROVIDER_TIMEOUT"]
    hung_up_within(peer_of(peers, kind), timeout + 1.0)


@pytest.mark.parametrize("kind", HTTP_KINDS)
def test_an_answer_larger_than_any_api_sends_is_not_read_to_its_end(client, host, peers, kind):
    connector = create_connector(client, host, kind, peers=peers)
    peer = peer_of(peers, kind)
    peer.mode = "huge"
    answer = send_test(client, host, connector["id"], DESTINATIONS[kind]).get_json()
    assert answer["error_code"] == "provider_error" and "more than 256 KiB" in answer["message"], answer
    hung_up_within(peer, 10)
    assert peer.bytes_written < 16 * 1024 * 1024  # the worker stopped reading long before the answer's end


def test_a_dispatch_whose_answer_drips_past_the_deadline_goes_on_to_the_next_channel_once(app, client, host, peers):
    create_connector(client, host, "whatsapp", peers=peers, priority=0)
    email = create_connector(client, host, "email", peers=peers, priority=1)
    peers.whatsapp.mode = "drip"
    final = wait_final(app, client, dispatch(client, host.id).get_json()["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == email["id"]
    whatsapp = final["attempts"][0]
    assert (whatsapp["type"], whatsapp["status"], whatsapp["error_code"]) == ("whatsapp", "unknown", "unknown")
    hung_up_within(peers.whatsapp, app.config["PROVIDER_TIMEOUT"] + 1.0)
    time.sleep(1)
    # Nothing recorded 'sent' later, and the message went out once through each channel.
    assert message(client, final["id"])["attempts"][0]["status"] == "unknown"
    assert len(peers.whatsapp.received) == 1 and len(peers.smtp.received) == 1


@pytest.mark.parametrize("kind", [*HTTP_KINDS, "email"])
def test_an_unreadable_success_is_unknown_and_that_connector_is_never_tried_again(app, client, host, peers, kind):
    fallback = "telegram" if kind == "email" else "email"
    garbled = create_connector(client, host, kind, peers=peers, priority=0)
    create_connector(client, host, fallback, peers=peers, priority=1)
    peer_of(peers, kind).mode = "garbled"
    peer_of(peers, fallback).mode = "error"  # the fallback fails for now: the message needs a second round
    created = dispatch(client, host.id, purpose="notification").get_json()
    deadline = time.monotonic() + 20
    while [a["type"] for a in message(client, created["id"])["attempts"]].count(fallback) < 2:
        assert time.monotonic() < deadline, message(client, created["id"])
        sweep(app)
        time.sleep(0.2)
    peer_of(peers, fallback).mode = "ok"
    final = wait_final(app, client, created["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["type"] == fallback
    attempts = [(a["connector_id"], a["status"], a["error_code"]) for a in final["attempts"]]
    assert attempts.count((garbled["id"], "unknown", "unknown")) == 1
    assert [a[0] for a in attempts].count(garbled["id"]) == 1  # not in the second round, nor later
    assert len(peer_of(peers, kind).received) == 1


def test_smtp_replies_past_any_real_dialogue_are_not_read_to_their_end(client, host, peers):
    connector = create_connector(client, host, "email", peers=peers)
    peers.smtp.mode = "endless"
    answer = send_test(client, host, connector["id"]).get_json()
    assert answer["error_code"] == "provider_error" and "replied more than 256 KiB" in answer["message"], answer


# --- a resolver that hangs ----------------------------------------------------------------------------------

HANGING_NAME = "resolver-hangs.example"


@pytest.fixture
def hanging_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """getaddrinfo for HANGING_NAME blocks until the test ends; every other name resolves as usual."""
    release = threading.Event()
    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name == HANGING_NAME:
            release.wait(120)
            raise socket.gaierror(socket.EAI_AGAIN, "released")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    yield release
    release.set()


@pytest.mark.parametrize("kind", ["email", *HTTP_KINDS])
def test_a_resolver_that_hangs_cannot_hold_a_provider_call_past_its_deadline(peers, hanging_resolver, kind):
    base = f"http://{HANGING_NAME}:80"
    settings = ProviderSettings(
        timeout=1.0, allow_private=True, twilio_base_url=base, whatsapp_base_url=base, telegram_base_url=base
    )
    provider = {"email": EmailProvider, "sms": TwilioSmsProvider, "whatsapp": WhatsAppProvider,
                "telegram": TelegramProvider}[kind](settings)  # fmt: skip
    config = config_for(kind, peers if kind == "email" else None, smtp_host=HANGING_NAME) if kind == "email" else (
        config_for(kind) | ({"api_version": "v24.0"} if kind == "whatsapp" else {})
    )
    started = time.monotonic()
    with pytest.raises(DeliveryError) as raised:
        provider.send(config, DESTINATIONS[kind], TEST_MESSAGE)
    assert time.monotonic() - started < 3.0
    assert raised.value.code == "provider_unreachable" and not raised.value.maybe_sent


@pytest.mark.skipif(USES_REDIS, reason="the resolver is replaced in this process; the worker here is another one")
def test_a_dispatch_through_a_hanging_resolver_goes_on_to_the_next_channel(app, client, host, peers, hanging_resolver):
    smtp = config_for("email", peers, smtp_host=HANGING_NAME)
    create_connector(client, host, "email", "hanging", config=smtp, priority=0)
    telegram = create_connector(client, host, "telegram", peers=peers, priority=1)
    final = wait_final(app, client, dispatch(client, host.id).get_json()["id"])
    assert final["status"] == "delivered" and final["delivered_via"]["connector_id"] == telegram["id"]
    assert [(a["type"], a["status"], a["error_code"]) for a in final["attempts"]] == [
        ("email", "failed", "provider_unreachable"),
        ("telegram", "sent", None),
    ]


# --- a process whose clock runs ahead ----------------------------------------------------------------------

FAKETIME_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")


@pytest.mark.skipif(not TEST_DATABASE_URL, reason="SQLite has no clock of its own: every process reads its own")
@pytest.mark.skipif(not FAKETIME_LIBRARY.exists(), reason="libfaketime (Debian's faketime package) is not installed")
def test_a_worker_whose_clock_runs_minutes_ahead_neither_closes_others_attempts_nor_expires_a_message(
    app, client, host, peers, tmp_path
):
    """Deadlines, leases and due times come from the database's clock: a worker 15 minutes ahead sweeps while
    another's send is in flight, and alone carries an OTP of 10 minutes, and nothing goes out twice or late."""
    skewed = sibling_app(app, tmp_path)
    # The wall clock 15 minutes ahead; the monotonic clock, which only measures intervals, left as it is.
    env = {
        **skewed.config["SIBLING_ENV"],
        "LD_PRELOAD": str(FAKETIME_LIBRARY),
        "FAKETIME": "+15m",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "EVENTS_WEBHOOK_URL": "",  # its events would reach the session's receiver stamped 15 minutes ahead
    }
    log_path = tmp_path / "skewed-worker.log"
    worker = _start_worker_subprocess(env, log_path)
    try:
        wait_for_worker(skewed, worker, log_path)
        create_connector(client, host, "whatsapp", peers=peers, priority=0)
        create_connector(client, host, "email", peers=peers, priority=1)
        peers.whatsapp.delay = 1.5  # a send in flight, well inside its lease
        first = dispatch(client, host.id).get_json()
        deadline = time.monotonic() + 10
        while not [a for a in message(client, first["id"])["attempts"] if a["status"] == "sending"]:
            assert time.monotonic() < deadline, message(client, first["id"])
            time.sleep(0.05)
        sweep(skewed)  # in the worker whose clock runs ahead
        assert [a["status"] for a in message(client, first["id"])["attempts"]] == ["sending"]
        final = wait_final(app, client, first["id"])
        assert final["status"] == "delivered" and final["delivered_via"]["type"] == "whatsapp"
        assert peers.smtp.received == []

        peers.whatsapp.delay = 0
        second = dispatch(skewed.test_client(), host.id).get_json()  # its jobs go to the skewed worker only
        final = wait_final(skewed, skewed.test_client(), second["id"])
        assert final["status"] == "delivered" and final["delivered_via"]["type"] == "whatsapp", final
        assert len(peers.whatsapp.received) == 2 and peers.smtp.received == []
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
