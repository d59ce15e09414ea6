"""Bearer tokens: what gets in, and the 401/403 envelope for everything that does not."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

import jwt as pyjwt
import pytest

from tests.conftest import JWT_SECRET, make_token

ENDPOINTS = [
    ("get", "/api/connectors"),
    ("post", "/api/connectors"),
    ("put", f"/api/connectors/{uuid.uuid4()}"),
    ("delete", f"/api/connectors/{uuid.uuid4()}"),
    ("post", f"/api/connectors/{uuid.uuid4()}/test"),
    ("get", f"/api/connectors/{uuid.uuid4()}/deliveries"),
    ("put", f"/api/internal/hosts/{uuid.uuid4()}/will"),
]


def _unsigned(payload: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def _bad_tokens() -> dict[str, str]:
    host = str(uuid.uuid4())
    now = int(time.time())
    return {
        "expired": make_token(host, expires_in=-10),
        "not yet valid": make_token(host, nbf=now + 3600),
        "wrong signature": make_token(host, secret="another-secret-" + "x" * 32),
        "alg none": _unsigned({"sub": host, "iat": now, "exp": now + 600}),
        "refresh token": make_token(host, type="refresh"),
        "no sub": make_token(None),
        "sub not a uuid": make_token("host-42"),
        "no exp": pyjwt.encode({"sub": host, "iat": now}, JWT_SECRET, algorithm="HS256"),
        "garbage": "not.a.token",
        "HS512": pyjwt.encode({"sub": host, "iat": now, "exp": now + 600}, JWT_SECRET, algorithm="HS512"),
        "service token as a Host": make_token(host, role="service"),
    }


@pytest.mark.parametrize("case", list(_bad_tokens()))
@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_bad_tokens_are_401_with_the_json_envelope(client, case, method, path):
    if case in {"sub not a uuid", "service token as a Host"} and "/internal/" in path:
        pytest.skip("services are not Hosts: their sub is a name, and a Host-less token there is a 403")
    token = _bad_tokens()[case]
    response = getattr(client, method)(path, headers={"Authorization": f"Bearer {token}"}, json={})
    assert response.status_code == 401, (case, response.get_json())
    body = response.get_json()
    assert body["code"] == 401 and body["status"] == "Unauthorized" and body["message"]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "Token x"])
def test_missing_or_malformed_headers_are_401(client, header):
    headers = {} if header is None else {"Authorization": header}
    response = client.get("/api/connectors", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["code"] == 401


def test_a_token_with_only_sub_iat_exp_is_accepted(client):
    host = str(uuid.uuid4())
    now = int(time.time())
    token = pyjwt.encode({"sub": host, "iat": now, "exp": now + 60}, JWT_SECRET, algorithm="HS256")
    assert client.get("/api/connectors", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_a_token_is_refused_once_it_expires(client):
    host = str(uuid.uuid4())
    exp = time.time() + 1.5
    token = pyjwt.encode({"sub": host, "iat": int(time.time()), "exp": exp}, JWT_SECRET, algorithm="HS256")
    headers = {"Authorization": f"Bearer {token}"}
    assert [client.get("/api/connectors", headers=headers).status_code for _ in range(3)] == [200] * 3
    time.sleep(max(0.0, exp - time.time()) + 0.1)
    expired = client.get("/api/connectors", headers=headers)
    assert expired.status_code == 401 and expired.get_json()["message"] == "Token has expired"


def test_every_protected_view_goes_through_flask_jwt_extended_on_every_request(app, client, service_env):
    """get_jwt() works in every protected view, on the first and on the second request with one token."""
    from flask import request_finished
    from flask_jwt_extended import get_jwt

    from app import create_app

    host_token = make_token(str(uuid.uuid4()))
    service_token = make_token("will-service", role="service")
    protected = [
        (rule, method)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith(("/api/connectors", "/api/internal"))
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"})
    ]
    assert len(protected) >= 6
    seen: list[str | None] = []

    def claims_in_view(sender, response, **extra):  # noqa: ANN001, ANN202, ARG001
        seen.append(get_jwt().get("sub"))  # raises outside a view that verified a token

    with request_finished.connected_to(claims_in_view, app):
        for rule, method in protected:
            path = re.sub(r"<[^>]+>", str(uuid.uuid4()), rule.rule)
            token = service_token if rule.rule.startswith("/api/internal") else host_token
            for _ in range(2):
                seen.clear()
                response = client.open(path, method=method, headers={"Authorization": f"Bearer {token}"}, json={})
                assert response.status_code != 500, (method, path, response.get_json())
                assert seen and seen[0] in {"will-service", jwt_sub(host_token)}, (method, path, response.status_code)
    # Key rotation takes effect at once: an app with another secret refuses the same token.
    other = create_app(env={**service_env, "JWT_SECRET_KEY": "a-different-secret-" + "y" * 32})
    refused = other.test_client().get("/api/connectors", headers={"Authorization": f"Bearer {host_token}"})
    assert refused.status_code == 401


def jwt_sub(token: str) -> str:
    return pyjwt.decode(token, options={"verify_signature": False})["sub"]


def test_the_will_endpoint_refuses_host_tokens_with_403(client):
    host = str(uuid.uuid4())
    response = client.put(
        f"/api/internal/hosts/{host}/will",
        json={"active": True},
        headers={"Authorization": f"Bearer {make_token(host)}"},
    )
    assert response.status_code == 403 and response.get_json()["code"] == 403


def test_cli_mints_a_token_the_api_accepts(app, client):
    host = str(uuid.uuid4())
    result = app.test_cli_runner().invoke(args=["token", host])
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert client.get("/api/connectors", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert pyjwt.decode(token, JWT_SECRET, algorithms=["HS256"])["sub"] == host

    refused = app.test_cli_runner().invoke(args=["token", "not-a-uuid"])
    assert refused.exit_code != 0

    service = app.test_cli_runner().invoke(args=["token", "will-service", "--service"]).output.strip()
    will = client.put(
        f"/api/internal/hosts/{host}/will", json={"active": True}, headers={"Authorization": f"Bearer {service}"}
    )
    assert will.status_code == 200
