"""Rotating the master key: `reseal-configs` moves connector configs, the bodies of messages in flight and Hosts'
digest keys to the new key, so the old key can go as soon as it reports; replays survive the rotation."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, event, text
from werkzeug.test import TestResponse

from app.auth.models import Host as HostRow
from app.crypto import key_id
from app.extensions import db
from app.messages.models import Message
from app.timeutil import utcnow
from tests.conftest import MASTER_KEY, _start_worker_subprocess, create_connector, service_headers
from tests.support import db_id, run_periodic, sibling_app, wait_for_worker

pytestmark = pytest.mark.usefixtures("worker")

OLD_KEY = MASTER_KEY  # what the session's app and worker seal with
NEW_KEY = "44" * 32
TEXT = "Your will has been released. Sign in to read it."
RECIPIENT = {"phone": "+14155552671", "telegram_chat_id": "123456789"}


def _post(http: FlaskClient, host_id: uuid.UUID, key: str, **fields: Any) -> TestResponse:
    body = {"purpose": "notification", "recipient": RECIPIENT, "text": TEXT, **fields}
    headers = {**service_headers(), "Idempotency-Key": key}
    return http.post(f"/api/internal/hosts/{host_id}/messages", json=body, headers=headers)


def _message(http: FlaskClient, message_id: str) -> dict[str, Any]:
    response = http.get(f"/api/internal/messages/{message_id}", headers=service_headers())
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _wait(
    http: FlaskClient, message_id: str, done: Callable[[dict[str, Any]], bool], step: Callable[[], None]
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while not done(current := _message(http, message_id)):
        assert time.monotonic() < deadline, current
        step()
        time.sleep(0.2)
    return current


def _final(message: dict[str, Any]) -> bool:
    return message["status"] in {"delivered", "failed", "expired", "unknown", "unconfirmed"}


def _rotated(app: Flask, tmp_path: Path) -> Flask:
    """The service mid-rotation: the new key seals, the old one still opens."""
    return sibling_app(app, tmp_path / "rotated", MASTER_KEY=NEW_KEY, OLD_MASTER_KEYS=OLD_KEY)


def _only_new(app: Flask, tmp_path: Path) -> Flask:
    """The service once the old key is gone."""
    return sibling_app(app, tmp_path / "only-new", MASTER_KEY=NEW_KEY, OLD_MASTER_KEYS="")


def _reseal(flask_app: Flask) -> Result:
    return flask_app.test_cli_runner().invoke(args=["reseal-configs"])


def _row(app: Flask, model: Any, row_id: str | uuid.UUID) -> dict[str, Any]:
    with app.app_context():
        found = db.session.get(model, uuid.UUID(str(row_id)), populate_existing=True)
        assert found is not None
        columns = {column.key: getattr(found, column.key) for column in model.__table__.columns}
        db.session.rollback()
    return columns


@contextmanager
def _worker_of(flask_app: Flask, tmp_path: Path) -> Iterator[None]:
    log_path = tmp_path / "worker.log"
    process = _start_worker_subprocess(flask_app.config["SIBLING_ENV"], log_path)
    try:
        wait_for_worker(flask_app, process, log_path)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def _before_statement(app: Flask, matches: Callable[[str], bool], run: Callable[[], None]) -> Iterator[None]:
    """Run `run` in the thread about to send a statement that `matches`, just before it is sent."""
    with app.app_context():
        engine = db.engine

    def hook(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if matches(statement):
            run()

    event.listen(engine, "before_cursor_execute", hook)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", hook)


def test_a_message_in_flight_during_a_rotation_is_delivered_once_the_old_key_is_gone(
    app, client, host, peers, tmp_path
):
    connector = create_connector(client, host, "sms", peers=peers)
    peers.twilio.mode = "error"  # the provider is down: the message waits for its next round
    # Before the rotation, under the old key, with a backoff long enough that the next round is the sweep's.
    before = sibling_app(app, tmp_path / "before", DISPATCH_RETRY_BASE="600", DISPATCH_RETRY_MAX="600")
    with _worker_of(before, tmp_path / "before"):
        created = _post(before.test_client(), host.id, "release-1")
        assert created.status_code == 202, created.get_json()
        message_id = created.get_json()["id"]
        waiting = _wait(client, message_id, lambda m: m["status"] == "retrying" and m["attempts"], lambda: None)
    assert [(a["status"], a["error_code"]) for a in waiting["attempts"]] == [("failed", "provider_error")]
    assert _row(app, Message, message_id)["body_key_id"] == key_id(bytes.fromhex(OLD_KEY))

    resealed = _reseal(_rotated(app, tmp_path))
    assert resealed.exit_code == 0, resealed.output
    assert "re-sealed 1 connector(s)" in resealed.output
    assert "re-sealed 1 message body(ies)" in resealed.output
    assert "re-sealed 1 Host digest key(s)" in resealed.output
    assert _row(app, Message, message_id)["body_key_id"] == key_id(bytes.fromhex(NEW_KEY))

    only_new = _only_new(app, tmp_path)
    http = only_new.test_client()
    peers.twilio.mode = "ok"  # the provider is back
    with app.app_context():  # and the next round has come
        db.session.execute(text("UPDATE messages SET due_at = created_at WHERE id = :m"), {"m": db_id(app, message_id)})
        db.session.commit()
    with _worker_of(only_new, tmp_path):
        final = _wait(http, message_id, _final, lambda: run_periodic(only_new, "dispatch.sweep"))
    assert final["status"] == "delivered", final
    assert final["delivered_via"] == {"connector_id": connector["id"], "type": "sms"}
    assert [(a["status"], a["error_code"]) for a in final["attempts"]] == [
        ("failed", "provider_error"),
        ("sent", None),
    ]
    assert [TEXT in json.dumps(item) for item in peers.twilio.received] == [True]


def test_a_replay_after_a_rotation_is_the_same_message_and_another_body_is_still_refused(
    app, client, host, peers, tmp_path
):
    create_connector(client, host, "telegram", peers=peers)
    first = _post(client, host.id, "release-2")
    assert first.status_code == 202, first.get_json()
    message_id = first.get_json()["id"]
    digest = _row(app, Message, message_id)["request_digest"]
    assert len(digest) == 64 and int(digest, 16) >= 0  # the column keeps its format
    assert _wait(client, message_id, _final, lambda: None)["status"] == "delivered"

    assert _reseal(_rotated(app, tmp_path)).exit_code == 0
    http = _only_new(app, tmp_path).test_client()
    again = _post(http, host.id, "release-2")
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["id"] == message_id
    other = _post(http, host.id, "release-2", text="Another text")
    assert other.status_code == 422 and other.get_json()["error_code"] == "idempotency_key_reused"
    assert len(peers.telegram.received) == 1


def _legacy_digest(master_key: str, host_id: uuid.UUID, body: dict[str, Any]) -> str:
    """A request digest as made before Hosts had a digest key: keyed by a derivation of the master key."""
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=b"bapba-connectors/v1", info=b"digest:" + host_id.bytes
    ).derive(bytes.fromhex(master_key))
    return hmac.new(key, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def test_a_digest_made_before_hosts_had_digest_keys_is_recognised_while_its_master_key_is_in_the_keyring(
    app, client, host, peers, tmp_path
):
    create_connector(client, host, "telegram", peers=peers)
    message_id = _post(client, host.id, "release-3").get_json()["id"]
    assert _wait(client, message_id, _final, lambda: None)["status"] == "delivered"
    body = {"purpose": "notification", "recipient": RECIPIENT, "text": TEXT}
    with app.app_context():  # as the row was written before this version
        row = db.session.get(Message, uuid.UUID(message_id))
        row.request_digest = _legacy_digest(OLD_KEY, host.id, body)
        db.session.commit()

    assert _post(client, host.id, "release-3").status_code == 200  # the old key is the current one
    rotated = _rotated(app, tmp_path)
    assert _reseal(rotated).exit_code == 0
    replay = _post(rotated.test_client(), host.id, "release-3")
    assert replay.status_code == 200 and replay.get_json()["id"] == message_id  # the old key is an old one
    other = _post(rotated.test_client(), host.id, "release-3", text="Another text")
    assert other.status_code == 422 and other.get_json()["error_code"] == "idempotency_key_reused"
    # As documented: without its master key, such a digest is no longer recognised.
    gone = _post(_only_new(app, tmp_path).test_client(), host.id, "release-3")
    assert gone.status_code == 422 and gone.get_json()["error_code"] == "idempotency_key_reused"


class _FirstWritesFirst:
    """Two requests line up so that both have read "no digest key yet", then the first to go writes its key,
    commits and reads the key back before the second may write its own: the second must not replace it."""

    def __init__(self) -> None:
        self.both_read = threading.Barrier(2, timeout=3)
        self.first_read_back = threading.Event()
        self.lock = threading.Lock()
        self.first: int | None = None

    @staticmethod
    def writes_key(statement: str) -> bool:
        return statement.lstrip().upper().startswith("UPDATE HOSTS") and "digest_key_sealed" in statement

    @staticmethod
    def reads_key(statement: str) -> bool:
        return statement.lstrip().upper().startswith("SELECT") and "hosts.digest_key_sealed" in statement

    def before(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not self.writes_key(statement):
            return
        try:
            self.both_read.wait()
        except threading.BrokenBarrierError:  # a design that lets one request at a time this far: no race to force
            return
        with self.lock:
            if self.first is None:
                self.first = threading.get_ident()
                return
        self.first_read_back.wait(3)  # on PostgreSQL a locking design holds us up anyway: the timeout frees us

    def after(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if self.reads_key(statement) and self.first == threading.get_ident():
            self.first_read_back.set()


def test_two_first_messages_of_a_host_at_once_share_one_digest_key(app, client, host, peers):
    create_connector(client, host, "telegram", peers=peers)
    with app.app_context():
        engine = db.engine
    order = _FirstWritesFirst()
    event.listen(engine, "before_cursor_execute", order.before)
    event.listen(engine, "after_cursor_execute", order.after)
    try:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda key: _post(app.test_client(), host.id, key), ["first-a", "first-b"]))
    finally:
        event.remove(engine, "before_cursor_execute", order.before)
        event.remove(engine, "after_cursor_execute", order.after)
    assert [answer.status_code for answer in answers] == [202, 202], [answer.get_json() for answer in answers]
    for key, answer in zip(["first-a", "first-b"], answers, strict=True):
        replay = _post(client, host.id, key)
        assert replay.status_code == 200, (key, replay.get_json())
        assert replay.get_json()["id"] == answer.get_json()["id"]
    assert _row(app, HostRow, host.id)["digest_key_sealed"] is not None
    for answer in answers:  # nothing left in flight for the next test's clean-up to collide with
        assert _wait(client, answer.get_json()["id"], _final, lambda: None)["status"] == "delivered"


def test_a_message_that_ends_while_its_body_is_re_sealed_keeps_its_body_erased(app, client, host, peers, tmp_path):
    create_connector(client, host, "telegram", peers=peers)
    lonely = sibling_app(app, tmp_path / "lonely")  # no worker on its broker: the message stays queued
    message_id = _post(lonely.test_client(), host.id, "release-4").get_json()["id"]
    assert _row(app, Message, message_id)["body_sealed"] is not None
    finisher = create_engine(app.config["SQLALCHEMY_DATABASE_URI"])

    def finish() -> None:  # what the worker writes when a message ends: its words are erased
        with finisher.begin() as connection:
            connection.execute(
                text(
                    "UPDATE messages SET status = 'delivered', due_at = NULL, finished_at = :now, delivered_at = :now, "
                    "body_key_id = NULL, body_sealed = NULL WHERE id = :id"
                ),
                {"now": utcnow(), "id": db_id(app, message_id)},
            )

    finished: list[threading.Thread] = []

    def finish_meanwhile() -> None:  # once; on PostgreSQL it waits for the batch's row lock, so not for long
        if not finished:
            finished.append(threading.Thread(target=finish))
            finished[0].start()
            finished[0].join(2)

    def writes_body(statement: str) -> bool:
        return statement.lstrip().upper().startswith("UPDATE MESSAGES") and "body_sealed" in statement

    rotated = _rotated(app, tmp_path)
    with _before_statement(rotated, writes_body, finish_meanwhile):
        resealed = _reseal(rotated)
    finished[0].join(10)
    finisher.dispose()
    assert resealed.exit_code == 0, resealed.output
    row = _row(app, Message, message_id)
    assert row["status"] == "delivered" and row["body_sealed"] is None and row["body_key_id"] is None


def test_bodies_and_digest_keys_no_known_key_opens_are_listed_and_the_command_fails(app, client, host, peers, tmp_path):
    create_connector(client, host, "telegram", peers=peers)
    lonely = sibling_app(app, tmp_path / "lonely")
    message_id = _post(lonely.test_client(), host.id, "release-5").get_json()["id"]
    with app.app_context():  # sealed under a key since removed from the keyring
        db.session.get(Message, uuid.UUID(message_id)).body_key_id = "0" * 16
        db.session.get(HostRow, host.id).digest_key_id = "0" * 16
        db.session.commit()
    rotated = _rotated(app, tmp_path)
    stuck = _reseal(rotated)
    assert stuck.exit_code == 1
    assert "re-sealed 1 connector(s)" in stuck.output  # the others are re-sealed all the same
    assert f"1 message body(ies) open with no known key: {message_id}" in stuck.output
    assert f"1 Host digest key(s) open with no known key: {host.id}" in stuck.output
    # As documented: until the key is back, the Host's digest key cannot be read, so no new message is taken.
    refused = _post(rotated.test_client(), host.id, "release-6")
    assert refused.status_code == 500, refused.get_json()


def test_the_destination_of_a_test_in_progress_is_re_sealed_too(app, client, host, tmp_path):
    from app.attempts import DeliveryAttempt
    from app.crypto import Keyring, Sealed

    connector = create_connector(client, host, "sms")
    attempt_id = uuid.uuid4()
    old = Keyring(bytes.fromhex(OLD_KEY)).seal(host.id, attempt_id, {"destination": "+14155550199"})
    with app.app_context():
        db.session.add(
            DeliveryAttempt(
                id=attempt_id, connector_id=uuid.UUID(connector["id"]), destination="+14*******99",
                destination_key_id=old.key_id, destination_sealed=old.ciphertext,
            )
        )  # fmt: skip
        db.session.commit()
    resealed = _reseal(_rotated(app, tmp_path))
    assert resealed.exit_code == 0 and "re-sealed 1 test destination(s)" in resealed.output, resealed.output
    row = _row(app, DeliveryAttempt, attempt_id)
    assert row["destination_key_id"] == key_id(bytes.fromhex(NEW_KEY))
    opened = Keyring(bytes.fromhex(NEW_KEY)).open(
        host.id, attempt_id, Sealed(row["destination_key_id"], row["destination_sealed"])
    )
    assert opened == {"destination": "+14155550199"}
