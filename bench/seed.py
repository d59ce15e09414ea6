"""Hosts, tokens and connectors for the benchmarks: minted and inserted directly, or created through the API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import psycopg

TYPES = ("email", "sms", "whatsapp", "telegram")
# Sealed configs are never opened by the endpoints that read seeded rows; this is their usual size.
SEALED_PLACEHOLDER = bytes(range(256))[:180]


@dataclass
class Host:
    id: uuid.UUID
    token: str
    connector_ids: list[uuid.UUID] = field(default_factory=list)


def mint(secret: str, host_id: uuid.UUID, hours: float = 6.0) -> str:
    """A token as the BAP auth service issues it: HS256 with sub, iat and exp."""
    now = int(time.time())
    return jwt.encode({"sub": str(host_id), "iat": now, "exp": now + int(hours * 3600)}, secret, algorithm="HS256")


def mint_service(secret: str, name: str = "bench-service", hours: float = 6.0) -> str:
    """A token of an internal BAPBA service (claim `role` = `service`), for the dispatch API."""
    now = int(time.time())
    claims = {"sub": name, "role": "service", "iat": now, "exp": now + int(hours * 3600)}
    return jwt.encode(claims, secret, algorithm="HS256")


def new_hosts(secret: str, count: int) -> list[Host]:
    hosts = []
    for _ in range(count):
        host_id = uuid.uuid4()
        hosts.append(Host(host_id, mint(secret, host_id)))
    return hosts


def _naive_utc() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


CONNECTOR_COLUMNS = (
    "id, host_id, type, name, priority, is_verified, config_key_id, config_sealed, created_at, updated_at"
)


def _copy(conn: psycopg.Connection, hosts: Sequence[Host], now: datetime, connectors: Iterable[tuple]) -> None:
    """COPY the Hosts, then the connectors (tuples in CONNECTOR_COLUMNS order), and commit."""
    with conn.cursor() as cursor:
        with cursor.copy("COPY hosts (id, will_active, created_at, updated_at) FROM STDIN") as copy:
            for host in hosts:
                copy.write_row((host.id, False, now, now))
        with cursor.copy(f"COPY connectors ({CONNECTOR_COLUMNS}) FROM STDIN") as copy:
            for row in connectors:
                copy.write_row(row)
    conn.commit()


def insert_hosts(conn: psycopg.Connection, hosts: Sequence[Host], connectors_each: int) -> None:
    """Insert the Hosts and `connectors_each` connectors for each, as the migrations' tables hold them."""
    now = _naive_utc()

    def connectors() -> Iterator[tuple]:
        for host in hosts:
            for index in range(connectors_each):
                connector_id = uuid.uuid4()
                host.connector_ids.append(connector_id)
                kind = TYPES[index % len(TYPES)]
                created = now - timedelta(seconds=connectors_each - index)
                yield (connector_id, host.id, kind, f"{kind} connector {index}", index % 3, index % 2 == 0,
                       "bench", SEALED_PLACEHOLDER, created, created)  # fmt: skip

    _copy(conn, hosts, now, connectors())


def insert_sealed_connectors(
    conn: psycopg.Connection,
    master_key_hex: str,
    hosts: Sequence[Host],
    connector_type: str,
    config: dict[str, Any],
    each: int,
) -> list[uuid.UUID]:
    """Insert the Hosts and `each` connectors of one type for each, whose config is really sealed under the
    Host's key (as the API seals it), so that a worker can open it; returns the new connectors' ids."""
    from app.crypto import Keyring

    keyring = Keyring(bytes.fromhex(master_key_hex))
    now = _naive_utc()
    ids: list[uuid.UUID] = []

    def connectors() -> Iterator[tuple]:
        for host in hosts:
            for index in range(each):
                connector_id = uuid.uuid4()
                sealed = keyring.seal(host.id, connector_id, config)
                created = now - timedelta(seconds=each - index)
                host.connector_ids.append(connector_id)
                ids.append(connector_id)
                yield (connector_id, host.id, connector_type, f"{connector_type} {index}", 0, False,
                       sealed.key_id, sealed.ciphertext, created, created)  # fmt: skip

    _copy(conn, hosts, now, connectors())
    return ids


def fill_table(conn: psycopg.Connection, hosts: int, connectors_each: int) -> list[uuid.UUID]:
    """Add `hosts` Hosts with `connectors_each` connectors each, in random physical order, as years of use
    leave a Host's rows scattered over the table; returns the new Hosts' ids. Generated inside PostgreSQL,
    which is many times faster than sending a million rows."""
    with conn.cursor() as cursor:
        cursor.execute(
            "CREATE TEMP TABLE bench_new_hosts AS SELECT gen_random_uuid() AS id FROM generate_series(1, %s)", (hosts,)
        )
        cursor.execute(
            "INSERT INTO hosts (id, will_active, created_at, updated_at) "
            "SELECT id, false, now() AT TIME ZONE 'utc', now() AT TIME ZONE 'utc' FROM bench_new_hosts"
        )
        cursor.execute(
            """
            INSERT INTO connectors
                (id, host_id, type, name, priority, is_verified, config_key_id, config_sealed, created_at, updated_at)
            SELECT gen_random_uuid(), h.id, (ARRAY['email', 'sms', 'whatsapp', 'telegram'])[1 + i %% 4],
                   'connector ' || i, i %% 3, i %% 2 = 0, 'bench', %s,
                   now() AT TIME ZONE 'utc' - i * interval '1 minute', now() AT TIME ZONE 'utc'
            FROM bench_new_hosts h CROSS JOIN generate_series(1, %s) AS i
            ORDER BY random()
            """,
            (SEALED_PLACEHOLDER, connectors_each),
        )
        ids = [row[0] for row in cursor.execute("SELECT id FROM bench_new_hosts")]
        cursor.execute("DROP TABLE bench_new_hosts")
    conn.commit()
    return ids


def analyze(conn: psycopg.Connection) -> None:
    """Fresh statistics and visibility map, as autovacuum would leave them after a bulk load."""
    conn.commit()
    conn.autocommit = True
    try:
        conn.execute("VACUUM ANALYZE hosts")
        conn.execute("VACUUM ANALYZE connectors")
    finally:
        conn.autocommit = False


def api_create(base_url: str, hosts: Sequence[Host], body: dict[str, Any], *, concurrency: int = 8) -> None:
    """Create one connector per Host through POST /api/connectors (the service seals its config)."""

    def create(host: Host) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            response = client.post("/api/connectors", json=body, headers={"Authorization": f"Bearer {host.token}"})
            if response.status_code != 201:
                raise RuntimeError(f"creating a connector answered {response.status_code}: {response.text}")
            host.connector_ids.append(uuid.UUID(response.json()["id"]))

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(create, hosts))
