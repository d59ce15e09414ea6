"""Secrets never leak: not into the logs, whatever the level and whatever the outcome."""

from __future__ import annotations

import logging
import time

from tests.conftest import SECRET_VALUES, config_for, create_connector
from tests.support import DESTINATIONS, send_test


def test_no_secret_reaches_the_logs_at_debug_level(app, client, host, peers, worker, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    for kind in ("email", "sms", "whatsapp", "telegram"):
        connector = create_connector(client, host, kind, peers=peers)
        assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 200
        peer = {"email": peers.smtp, "sms": peers.twilio, "whatsapp": peers.whatsapp, "telegram": peers.telegram}[kind]
        peer.mode = "auth"
        assert send_test(client, host, connector["id"], DESTINATIONS[kind]).status_code == 502
        client.put(f"/api/connectors/{connector['id']}", json={"config": config_for(kind, peers)}, headers=host.headers)
    logged = caplog.text + capsys.readouterr().out
    worker_log = getattr(worker, "log_path", None)  # the subprocess worker of the Redis run
    if worker_log:
        time.sleep(0.5)
        logged += worker_log.read_text()
    assert "test delivery" in logged  # the worker's lines were captured too
    for secret in SECRET_VALUES:
        assert secret not in logged
