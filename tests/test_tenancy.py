"""Tenancy: a host can neither see nor touch another host's connectors."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from tests.conftest import config_for, create_connector
from tests.support import db_id, send_test


@pytest.mark.usefixtures("worker")
def test_another_hosts_connector_is_404_on_every_endpoint_and_unchanged(app, client, host, other_host, peers):
    theirs = create_connector(client, other_host, "email", "theirs", peers=peers)
    before = _row(app, theirs["id"])
    cid = theirs["id"]
    answers = [
        client.put(f"/api/connectors/{cid}", json={"name": "stolen", "priority": 9}, headers=host.headers),
        client.put(f"/api/connectors/{cid}", json={"config": config_for("email")}, headers=host.headers),
        client.delete(f"/api/connectors/{cid}", headers=host.headers),
        send_test(client, host, cid),
        client.get(f"/api/connectors/{cid}/deliveries", headers=host.headers),
    ]
    assert [a.status_code for a in answers] == [404] * 5
    assert all(a.get_json()["message"] == "Connector not found" for a in answers)
    assert _row(app, cid) == before
    assert client.get("/api/connectors", headers=host.headers).get_json() == {"connectors": []}
    assert peers.smtp.received == []


def _row(app, connector_id: str):  # noqa: ANN001, ANN202
    from app.extensions import db

    with app.app_context():
        row = db.session.execute(
            text("SELECT * FROM connectors WHERE id = :id"), {"id": db_id(app, connector_id)}
        ).one()
        db.session.rollback()
    return tuple(row)
