"""The Connectors API contract, through HTTP."""

from __future__ import annotations

import re
import uuid

import pytest
from sqlalchemy import text

from tests.conftest import SECRET_VALUES, config_for, create_connector, new_host, service_headers
from tests.support import database_work

FIELDS = {"id", "type", "name", "is_verified", "priority", "created_at"}
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def test_create_returns_201_with_exactly_the_six_fields(client, host):
    for kind in ("email", "sms", "whatsapp", "telegram"):
        body = create_connector(client, host, kind, priority=2)
        assert set(body) == FIELDS
        assert body["type"] == kind and body["priority"] == 2 and body["is_verified"] is False
        uuid.UUID(body["id"])
        assert TIMESTAMP.match(body["created_at"])


def test_seed_examples_are_accepted_as_written(client, host):
    seed_sms = {
        "type": "sms",
        "name": "Twilio Primary",
        "config": {
            "provider": "twilio",
            "api_key_sid": "SK" + "0123456789abcdef" * 2,
            "api_key_secret": "your_api_key_secret",
            "from_number": "+14155550123",
        },
        "priority": 1,
    }
    seed_telegram = {
        "type": "telegram",
        "name": "Telegram Bot",
        "config": {"provider": "telegram", "bot_token": "1234567890:ABCdefGHIjklMNOpqrsTUVwxyz"},
        "priority": 3,
    }
    for body in (seed_sms, seed_telegram):
        response = client.post("/api/connectors", json=body, headers=host.headers)
        assert response.status_code == 201, response.get_json()


def test_list_returns_only_the_callers_connectors_ordered_by_priority_then_creation(client, host, other_host):
    third = create_connector(client, host, "sms", "c", priority=1)
    first = create_connector(client, host, "email", "a", priority=0)
    fourth = create_connector(client, host, "telegram", "d", priority=1)
    second = create_connector(client, host, "whatsapp", "b", priority=0)
    create_connector(client, other_host, "email", "theirs")

    response = client.get("/api/connectors", headers=host.headers)
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["connectors"]
    assert [c["id"] for c in body["connectors"]] == [first["id"], second["id"], third["id"], fourth["id"]]
    assert all(set(c) == FIELDS for c in body["connectors"])


def test_name_is_trimmed_and_priority_defaults_to_zero(client, host):
    response = client.post(
        "/api/connectors",
        json={"type": "email", "name": "  Mail  ", "config": config_for("email")},
        headers=host.headers,
    )
    assert response.status_code == 201
    assert response.get_json()["name"] == "Mail" and response.get_json()["priority"] == 0


def test_unicode_names_come_back_intact(client, host):
    name = "Почта 📮 ñ"
    assert create_connector(client, host, "email", name)["name"] == name


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "fax", "name": "x", "config": {}}, "type"),
        ({"type": "email", "name": "   ", "config": config_for("email")}, "name"),
        ({"type": "email", "name": "x" * 101, "config": config_for("email")}, "name"),
        ({"type": "email", "name": "tab\there", "config": config_for("email")}, "name"),
        ({"type": "email", "name": "x", "priority": -1, "config": config_for("email")}, "priority"),
        ({"type": "email", "name": "x", "priority": "1", "config": config_for("email")}, "priority"),
        ({"type": "email", "name": "x", "priority": True, "config": config_for("email")}, "priority"),
        ({"type": "email", "name": "x"}, "config"),
        ({"type": "email", "name": "x", "config": "smtp"}, "config"),
        ({"type": "email", "name": "x", "config": config_for("email"), "extra": 1}, "extra"),
    ],
)
def test_invalid_top_level_fields_are_400_with_the_field_named(client, host, body, field):
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 400
    payload = response.get_json()
    assert payload["code"] == 400 and payload["status"] == "Bad Request"
    assert field in payload["errors"]["json"]


@pytest.mark.parametrize(
    ("kind", "overrides", "field"),
    [
        ("email", {"smtp_port": 0}, "smtp_port"),
        ("email", {"smtp_port": 70000}, "smtp_port"),
        ("email", {"smtp_port": "587"}, "smtp_port"),
        ("email", {"from_address": "not-an-address"}, "from_address"),
        ("email", {"security": "tls13"}, "security"),
        ("email", {"smtp_host": "http://smtp.example.com/"}, "smtp_host"),
        ("email", {"unknown": "x"}, "unknown"),
        ("sms", {"provider": "nexmo"}, "provider"),
        ("sms", {"from_number": "4155550100"}, "from_number"),
        ("sms", {"from_number": "+1234567890"}, "from_number"),
        ("sms", {"api_key_sid": "SKshort"}, "api_key_sid"),
        ("sms", {"account_sid": "SK" + "a" * 32}, "account_sid"),
        ("whatsapp", {"provider": "twilio"}, "provider"),
        ("whatsapp", {"phone_number_id": "12ab"}, "phone_number_id"),
        ("whatsapp", {"business_account_id": 987}, "business_account_id"),
        ("whatsapp", {"api_version": "24"}, "api_version"),
        ("telegram", {"bot_token": "no-colon-token"}, "bot_token"),
        ("telegram", {"provider": "tg"}, "provider"),
    ],
)
def test_invalid_config_fields_are_400_per_field(client, host, kind, overrides, field):
    body = {"type": kind, "name": "x", "config": config_for(kind, **overrides)}
    response = client.post("/api/connectors", json=body, headers=host.headers)
    assert response.status_code == 400, response.get_json()
    assert field in response.get_json()["errors"]["json"]["config"]


@pytest.mark.parametrize("missing", ["smtp_host", "smtp_port", "username", "password", "from_address"])
def test_each_required_email_field_is_required(client, host, missing):
    config = config_for("email")
    del config[missing]
    response = client.post(
        "/api/connectors", json={"type": "email", "name": "x", "config": config}, headers=host.headers
    )
    assert response.status_code == 400
    assert missing in response.get_json()["errors"]["json"]["config"]


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        ("{not json", "application/json"),
        ("[1, 2]", "application/json"),
        ("type=email", "application/x-www-form-urlencoded"),
        ('"str"', "application/json"),
    ],
)
def test_malformed_or_non_object_or_non_json_bodies_are_400(client, host, data, content_type):
    response = client.post("/api/connectors", data=data, content_type=content_type, headers=host.headers)
    assert response.status_code == 400
    assert response.get_json()["code"] == 400


def test_duplicate_type_and_name_is_409_but_other_hosts_may_reuse_it(client, host, other_host):
    create_connector(client, host, "email", "Same")
    again = client.post(
        "/api/connectors", json={"type": "email", "name": "Same", "config": config_for("email")}, headers=host.headers
    )
    assert again.status_code == 409
    assert again.get_json()["status"] == "Conflict"
    create_connector(client, host, "sms", "Same")  # another type may share the name
    create_connector(client, other_host, "email", "Same")


def test_update_changes_name_and_priority_partially(client, host):
    created = create_connector(client, host, "email", "SMTP Email")
    response = client.put(f"/api/connectors/{created['id']}", json={"priority": 4}, headers=host.headers)
    assert response.status_code == 200
    assert response.get_json() == {**created, "priority": 4}
    response = client.put(f"/api/connectors/{created['id']}", json={"name": "SMTP Updated"}, headers=host.headers)
    assert response.get_json() == {**created, "priority": 4, "name": "SMTP Updated"}


def test_update_with_new_config_validates_for_the_type_and_resets_verification(app, client, host):
    created = create_connector(client, host, "email")
    from app.extensions import db

    with app.app_context():
        db.session.execute(text("UPDATE connectors SET is_verified = :v"), {"v": True})
        db.session.commit()
    assert client.get("/api/connectors", headers=host.headers).get_json()["connectors"][0]["is_verified"] is True

    bad = client.put(f"/api/connectors/{created['id']}", json={"config": config_for("sms")}, headers=host.headers)
    assert bad.status_code == 400
    assert "config" in bad.get_json()["errors"]["json"]

    good = client.put(
        f"/api/connectors/{created['id']}", json={"config": config_for("email", smtp_port=2525)}, headers=host.headers
    )
    assert good.status_code == 200
    assert good.get_json()["is_verified"] is False


def test_update_cannot_change_type_and_must_change_something(client, host):
    created = create_connector(client, host, "email")
    assert client.put(f"/api/connectors/{created['id']}", json={"type": "sms"}, headers=host.headers).status_code == 400
    assert client.put(f"/api/connectors/{created['id']}", json={}, headers=host.headers).status_code == 400
    same_type = client.put(
        f"/api/connectors/{created['id']}", json={"type": "email", "priority": 1}, headers=host.headers
    )
    assert same_type.status_code == 200


def test_update_to_a_taken_name_is_409(client, host):
    create_connector(client, host, "email", "one")
    second = create_connector(client, host, "email", "two")
    response = client.put(f"/api/connectors/{second['id']}", json={"name": "one"}, headers=host.headers)
    assert response.status_code == 409


def test_unknown_malformed_and_other_hosts_ids_are_404_and_change_nothing(client, host, other_host):
    theirs = create_connector(client, other_host, "email", "theirs")
    for connector_id in (str(uuid.uuid4()), "not-a-uuid", theirs["id"]):
        put = client.put(f"/api/connectors/{connector_id}", json={"name": "mine now"}, headers=host.headers)
        delete = client.delete(f"/api/connectors/{connector_id}", headers=host.headers)
        assert put.status_code == 404 and delete.status_code == 404
        assert put.get_json()["code"] == 404 and delete.get_json()["code"] == 404
    assert client.get("/api/connectors", headers=other_host.headers).get_json()["connectors"] == [theirs]


def test_delete_is_204_with_an_empty_body(client, host):
    created = create_connector(client, host, "email")
    response = client.delete(f"/api/connectors/{created['id']}", headers=host.headers)
    assert response.status_code == 204 and response.data == b""
    assert client.get("/api/connectors", headers=host.headers).get_json() == {"connectors": []}
    assert client.delete(f"/api/connectors/{created['id']}", headers=host.headers).status_code == 404


def _set_will(client, host_id, active: bool):
    return client.put(f"/api/internal/hosts/{host_id}/will", json={"active": active}, headers=service_headers())


def test_last_connector_cannot_be_deleted_while_the_will_is_active(client, host):
    first = create_connector(client, host, "email")
    second = create_connector(client, host, "sms")
    assert _set_will(client, host.id, True).get_json() == {"host_id": str(host.id), "will_active": True}

    assert client.delete(f"/api/connectors/{first['id']}", headers=host.headers).status_code == 204
    refused = client.delete(f"/api/connectors/{second['id']}", headers=host.headers)
    assert refused.status_code == 409
    assert "last connector" in refused.get_json()["message"]

    assert _set_will(client, host.id, False).status_code == 200
    assert client.delete(f"/api/connectors/{second['id']}", headers=host.headers).status_code == 204


def test_will_endpoint_creates_unknown_hosts_and_requires_a_service_token(client, host):
    stranger = uuid.uuid4()
    assert _set_will(client, stranger, True).status_code == 200
    as_host = client.put(f"/api/internal/hosts/{stranger}/will", json={"active": False}, headers=host.headers)
    assert as_host.status_code == 403 and as_host.get_json()["code"] == 403
    assert client.put(f"/api/internal/hosts/{stranger}/will", json={"active": False}).status_code == 401
    bad = client.put(f"/api/internal/hosts/{stranger}/will", json={"active": "maybe"}, headers=service_headers())
    assert bad.status_code == 400


def test_no_response_contains_a_secret_and_the_row_holds_only_ciphertext(app, client, host):
    bodies = []
    for kind in ("email", "sms", "whatsapp", "telegram"):
        bodies.append(create_connector(client, host, kind))
    bodies.append(client.get("/api/connectors", headers=host.headers).get_data(as_text=True))
    bodies.append(
        client.put(
            f"/api/connectors/{bodies[0]['id']}", json={"config": config_for("email")}, headers=host.headers
        ).get_data(as_text=True)
    )
    text_of_responses = " ".join(str(body) for body in bodies)
    from app.extensions import db

    with app.app_context():
        rows = db.session.execute(text("SELECT * FROM connectors")).all()
    dumped = " ".join(repr(tuple(row)) for row in rows)
    for secret in SECRET_VALUES:
        assert secret not in text_of_responses
        assert secret not in dumped
        assert secret.encode() not in b"".join(row.config_sealed for row in rows)
    assert "smtp.example.com" not in dumped  # the whole config is sealed, not only its secrets


def test_errors_are_json_everywhere(client, host):
    assert client.get("/nope").get_json()["code"] == 404
    not_allowed = client.patch("/api/connectors", headers=host.headers)
    assert not_allowed.status_code == 405 and not_allowed.get_json()["code"] == 405
    assert "GET" in not_allowed.headers["Allow"]
    too_big = client.post(
        "/api/connectors",
        data='{"name": "' + "x" * 70_000 + '"}',
        content_type="application/json",
        headers=host.headers,
    )
    assert too_big.status_code == 413 and too_big.get_json()["code"] == 413


def test_list_is_limited_to_100_per_minute_per_host(client, host, other_host):
    for _ in range(100):
        assert client.get("/api/connectors", headers=host.headers).status_code == 200
    limited = client.get("/api/connectors", headers=host.headers)
    assert limited.status_code == 429
    assert limited.get_json()["code"] == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert limited.headers["X-RateLimit-Limit"] == "100" and limited.headers["X-RateLimit-Remaining"] == "0"
    assert client.get("/api/connectors", headers=other_host.headers).status_code == 200


def test_the_list_is_one_statement_outside_a_transaction_and_hands_back_a_transactional_connection(app, client, host):
    # BENCHMARKS.md, figure 1: the list's own database work is one SELECT of the shown columns, with no BEGIN
    # and ROLLBACK around it; the connection goes back to the pool transactional, for the writes that lock.
    create_connector(client, host, "email")
    create_connector(client, host, "sms")
    with database_work(app) as work:
        answer = client.get("/api/connectors", headers=host.headers)
    assert [c["type"] for c in answer.get_json()["connectors"]] == ["email", "sms"]
    assert len(work.statements) == 1, work.statements
    statement, in_autocommit = work.statements[0]
    assert statement.lstrip().upper().startswith("SELECT") and in_autocommit
    assert "config_sealed" not in statement and "config_key_id" not in statement
    assert work.checked_in == [False]


def test_create_is_limited_to_10_per_hour_per_host(client, host):
    for number in range(10):
        create_connector(client, host, "email", f"n{number}")
    limited = client.post(
        "/api/connectors", json={"type": "email", "name": "n10", "config": config_for("email")}, headers=host.headers
    )
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 60
    create_connector(client, new_host(), "email")


def test_created_at_and_order_survive_many_hosts(client):
    hosts = [new_host() for _ in range(3)]
    for index, owner in enumerate(hosts):
        create_connector(client, owner, "email", f"mail {index}")
    for index, owner in enumerate(hosts):
        names = [c["name"] for c in client.get("/api/connectors", headers=owner.headers).get_json()["connectors"]]
        assert names == [f"mail {index}"]
