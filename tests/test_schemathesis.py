"""Every operation of /openapi.json, fuzzed by schemathesis with a Host's token: no 5xx, every answer as documented.

Generated path parameters are sometimes placeholders for things that exist: `EXISTING` maps a fixed uuid to a kind
of connector, `THIS_HOST` stands for the calling Host. Before the call, a placeholder becomes a real connector of a
fresh Host (or that Host), and the call carries that Host's token, so the operations answer from real rows, not
only 404. Every example has its own Host, so the per-Host rate limits seldom answer 429.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, HookContext
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Host, Peers, config_for, create_connector, new_host, service_headers

EXAMPLES_PER_OPERATION = 40
KINDS = ("email", "sms", "whatsapp", "telegram")
# The only connector of a Host whose will is active: deleting it is refused (409).
LAST_UNDER_ACTIVE_WILL = "last"
EXISTING = {
    str(uuid.uuid5(uuid.NAMESPACE_URL, f"bapba:existing:{name}")): name for name in (*KINDS, LAST_UNDER_ACTIVE_WILL)
}
THIS_HOST = str(uuid.uuid5(uuid.NAMESPACE_URL, "bapba:this-host"))
# Valid for one kind each. Before the call, a generated destination (or config) valid for some kind becomes the one
# valid for the kind of the connector called, so test sends and config updates can succeed.
DESTINATIONS = {
    "email": "survivor@example.org",
    "sms": "+14155550199",
    "whatsapp": "+14155550188",
    "telegram": "123456789",
}
# Every Host that lists or creates first gets one connector of each kind, named so, so a create can collide (409).
SEEDED_NAMES = [f"{kind} connector" for kind in KINDS]
# Names at the edges of what the API accepts, including lone surrogates: valid JSON string escapes with no UTF-8 form.
EDGE_NAMES = ["x" * 100, "x" * 101, "  padded  ", "   ", "tab\there", "a\ud800", "\udfff"]


def status_code_listed_for_the_operation(ctx: Any, response: Any, case: Any) -> None:
    """The operation lists the status. flask-smorest documents a `default` response on every operation, which
    `status_code_conformance` accepts for any status at all."""
    listed = sorted(code for code in case.operation.definition.raw["responses"] if code != "default")
    assert str(response.status_code) in listed, f"{response.status_code} is not one of the listed {listed}"


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    status_code_listed_for_the_operation,
    content_type_conformance,
    response_schema_conformance,
]


# `not_a_server_error` accepts the 5xx the service documents anywhere (a failed delivery's 502, a busy or
# unavailable 503); `status_code_listed_for_the_operation` then holds each operation to its own list. A 500 is
# listed nowhere.
DOCUMENTED_SERVER_ERRORS = ["2xx", "3xx", "4xx", "502", "503"]


def load_schema(app: Flask) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        # The Authorization header is not generated: every call carries a real token (`arrange`).
        {
            "generation": {"with-security-parameters": False},
            "checks": {"not_a_server_error": {"expected-statuses": DOCUMENTED_SERVER_ERRORS}},
        }
    )
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app, config=config)

    @schema.hook
    def before_generate_path_parameters(context: HookContext, strategy: st.SearchStrategy) -> st.SearchStrategy:
        path = context.operation.path
        if "{connector_id}" in path:
            existing = st.sampled_from(sorted(EXISTING)).map(lambda value: {"connector_id": value})
            return st.one_of(strategy, existing)
        if "{host_id}" in path:
            return st.one_of(strategy, st.just({"host_id": THIS_HOST}))
        return strategy

    @schema.hook
    def before_generate_body(context: HookContext, strategy: st.SearchStrategy) -> st.SearchStrategy:
        label = context.operation.label
        if label == "POST /api/connectors":
            return st.one_of(strategy, valid_create_bodies())
        if label == "PUT /api/connectors/{connector_id}":
            return st.one_of(strategy, valid_update_bodies())
        if label == "POST /api/connectors/{connector_id}/test":
            destinations = st.sampled_from(sorted(DESTINATIONS.values()))
            return st.one_of(strategy, destinations.map(lambda value: {"test_destination": value}))
        return strategy

    return schema


def names() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(SEEDED_NAMES + EDGE_NAMES), st.text(min_size=1, max_size=100))


def valid_create_bodies() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda kind, name, priority: {"type": kind, "name": name, "priority": priority, "config": config_for(kind)},
        st.sampled_from(KINDS),
        names(),
        st.integers(0, 1_000_000),
    )


def valid_update_bodies() -> st.SearchStrategy[dict[str, Any]]:
    fields = {"name": names(), "priority": st.integers(0, 1_000_000), "config": st.sampled_from(KINDS).map(config_for)}
    return st.fixed_dictionaries({}, optional=fields).filter(bool)


def path_value(case: schemathesis.Case, name: str) -> str | None:
    value = (case.path_parameters or {}).get(name)
    return value if isinstance(value, str) else None


def arrange(case: schemathesis.Case, client: FlaskClient, peers: Peers) -> dict[str, str]:
    """Create what the case's placeholders stand for; returns the headers to call with."""
    path = case.operation.path
    if path.startswith("/api/health"):
        return {}
    host = new_host()
    if path.startswith("/api/internal/"):
        if path_value(case, "host_id") == THIS_HOST:
            create_connector(client, host, "email", peers=peers)
            case.path_parameters["host_id"] = str(host.id)
        return service_headers()

    wanted = EXISTING.get(path_value(case, "connector_id") or "")
    kind = None
    if wanted == LAST_UNDER_ACTIVE_WILL:
        kind = "email"
        case.path_parameters["connector_id"] = create_connector(client, host, kind, peers=peers)["id"]
        set_will(client, host, active=True)
    elif wanted is not None or path == "/api/connectors":
        owned = {each: create_connector(client, host, each, peers=peers) for each in KINDS}
        if wanted is not None:
            kind = wanted
            case.path_parameters["connector_id"] = owned[kind]["id"]

    if kind is not None and isinstance(case.body, dict):
        retarget(case.body, kind)
    if kind is not None and path.endswith("/deliveries"):
        send_test(client, host, case.path_parameters["connector_id"], DESTINATIONS[kind])
    return host.headers


def retarget(body: dict[str, Any], kind: str) -> None:
    if body.get("test_destination") in DESTINATIONS.values():
        body["test_destination"] = DESTINATIONS[kind]
    if body.get("config") in [config_for(each) for each in KINDS]:
        body["config"] = config_for(kind)


def set_will(client: FlaskClient, host: Host, *, active: bool) -> None:
    response = client.put(f"/api/internal/hosts/{host.id}/will", json={"active": active}, headers=service_headers())
    assert response.status_code == 200, response.get_json()


def send_test(client: FlaskClient, host: Host, connector_id: str, destination: str) -> None:
    """One test delivery, so the connector has an attempt to list."""
    response = client.post(
        f"/api/connectors/{connector_id}/test", json={"test_destination": destination}, headers=host.headers
    )
    assert response.status_code in (200, 502), response.get_json()


def fuzz(operation: schemathesis.APIOperation, client: FlaskClient, peers: Peers) -> None:
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=cases)
    def call(case: schemathesis.Case) -> None:
        headers = arrange(case, client, peers)
        case.call_and_validate(headers=headers, checks=CHECKS)

    call()


@pytest.mark.usefixtures("worker")
def test_every_operation_answers_as_documented_without_server_errors(
    app: Flask, client: FlaskClient, peers: Peers, subtests: pytest.Subtests
) -> None:
    # One subtest per operation: `schemathesis.pytest.from_fixture` relies on `Item._nodeid`, gone in pytest 9.2.
    schema = load_schema(app)
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {
        f"{method.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert {operation.label for operation in operations} == documented
    for operation in operations:
        with subtests.test(msg=operation.label):
            fuzz(operation, client, peers)


# Formats the document names that JSON Schema does not define, for the generator: E.164 numbers, and email
# addresses on a domain that email-validator accepts (it refuses reserved names such as .test).
schemathesis.openapi.format("e164", st.sampled_from(["+14155550123", "+442071838750", "+4930901820", "+819012345678"]))
schemathesis.openapi.format("email", st.emails(domains=st.just("mail.example.org")))


def test_creates_generated_from_the_document_alone_are_accepted(app: Flask, client: FlaskClient) -> None:
    """The document says enough (oneOf by type, each type's config, name rules) to write a valid create."""
    document = client.get("/openapi.json").get_json()
    operation = schemathesis.openapi.from_dict(document)["/api/connectors"]["POST"]
    statuses: list[int] = []
    kinds: set[str] = set()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def create(case: schemathesis.Case) -> None:
        response = client.post("/api/connectors", json=case.body, headers=new_host().headers)
        assert response.status_code == 201, (case.body, response.get_json())
        statuses.append(response.status_code)
        kinds.add(case.body["type"])

    create()
    assert kinds == set(KINDS) and len(statuses) >= 30
