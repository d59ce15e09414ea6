"""Retention: the sweep's prune of a million attempt rows, and what a writer beside it feels.

`python -m bench.retention` (PostgreSQL must answer, as `bench/run` makes sure): a database of its own, migrated
by the service's migrations, is filled inside PostgreSQL with 180 days of history of CONNECTORS connectors (4
per Host): a check per connector a day, a test per connector a week, and MESSAGES delivered messages spread
evenly over the days, each with one to three dispatch attempts; about a million attempt rows, inserted in time
order as use leaves them. With the default 90-day settings, about half of it is due. Then:

1. a writer alone for WRITER_SECONDS: one transaction at a time, each inserting a finished check of a random
   connector, then (its own transaction) updating a recent message, then one updating a message that ended
   long ago (a row the prune is after), paced to about WRITER_RATE transactions a second;
2. the service's own prune (`prune_messages` and `prune_attempts` of `app.sweep`, in an app context), sweep after
   sweep until nothing is left, with the same writer running; every transaction of the prune is timed from its
   BEGIN to its COMMIT;
3. the writer alone again, and then 20 sweeps once the backlog is gone, 0.5 s apart: what every sweep costs
   from then on, when all there is to prune is what crossed the cutoff since the last one.

Printed: rows deleted a second; the median, 99th percentile and longest batch transaction; the writer's
median with no prune running, and its median, 99th percentile and longest transaction while the prune ran
(ratios to the median alone); the plans of the prune's queries. A benchmark, not a test: nothing here fails on
a number.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import event

from bench.stack import ROOT, Database

CONNECTORS = 2000
MESSAGES = 450_000
DAYS = 180
WRITER_SECONDS = 10.0
WRITER_RATE = 150.0


def _seed(conn: psycopg.Connection, connectors: int, messages: int, days: int) -> None:
    """The history, generated inside PostgreSQL, attempts inserted in the order they were made."""
    hosts = connectors // 4
    statements = [
        "CREATE TEMP TABLE b_hosts AS SELECT gen_random_uuid() AS id, n FROM generate_series(0, %(hosts)s - 1) n",
        "INSERT INTO hosts (id, will_active, created_at, updated_at) "
        "SELECT id, false, now() AT TIME ZONE 'utc' - interval '400 days', now() AT TIME ZONE 'utc' FROM b_hosts",
        "CREATE TEMP TABLE b_connectors AS SELECT gen_random_uuid() AS id, h.id AS host_id, h.n AS host_n, "
        "i AS slot, (ARRAY['email', 'sms', 'whatsapp', 'telegram'])[1 + i] AS type "
        "FROM b_hosts h CROSS JOIN generate_series(0, 3) i",
        "CREATE INDEX ON b_connectors (host_n, slot)",
        "INSERT INTO connectors (id, host_id, type, name, priority, is_verified, config_key_id, config_sealed, "
        "created_at, updated_at) SELECT id, host_id, type, type || ' ' || slot, slot, true, 'bench', "
        "'\\x00'::bytea, now() AT TIME ZONE 'utc' - interval '400 days', now() AT TIME ZONE 'utc' FROM b_connectors",
        # Messages evenly over the days, each ending 2 s after it began; a Host's in turn.
        "CREATE TEMP TABLE b_messages AS SELECT gen_random_uuid() AS id, i, i %% %(hosts)s AS host_n, "
        "now() AT TIME ZONE 'utc' - %(days)s * interval '1 day' * (1 - i::float / %(messages)s) AS created_at "
        "FROM generate_series(0, %(messages)s - 1) i",
        "INSERT INTO messages (id, host_id, idempotency_key, request_digest, purpose, status, routes, "
        "recipient_masked, round, expires_at, created_at, updated_at, delivered_at, finished_at, "
        "delivered_via_type) SELECT m.id, h.id, 'k' || m.i, repeat('0', 64), 'notification', 'delivered', "
        "'[\"email\"]', '{\"email\": \"a***@example.org\"}', 1, m.created_at + interval '1 hour', m.created_at, "
        "m.created_at + interval '2 s', m.created_at + interval '2 s', m.created_at + interval '2 s', 'email' "
        "FROM b_messages m JOIN b_hosts h ON h.n = m.host_n ORDER BY m.created_at",
        # Every attempt, in time order: checks daily, tests weekly, one to three attempts per message.
        """
        INSERT INTO delivery_attempts (id, connector_id, connector_type, kind, message_id, round, destination,
            status, error_code, message, delivery_time_ms, created_at, deadline_at, finished_at)
        SELECT gen_random_uuid(), connector_id, type, kind, message_id, round, destination, status, NULL,
               NULL, 40, created_at, created_at + interval '20 s', created_at + interval '1 s'
        FROM (
            SELECT c.id AS connector_id, c.type, 'check' AS kind, NULL::uuid AS message_id, NULL::int AS round,
                   NULL AS destination, 'verified' AS status,
                   now() AT TIME ZONE 'utc' - d * interval '1 day' - (c.host_n %% 1440) * interval '1 minute'
                       AS created_at
            FROM b_connectors c CROSS JOIN generate_series(0, %(days)s - 1) d
            UNION ALL
            SELECT c.id, c.type, 'test', NULL, NULL, 's***@example.org', 'sent',
                   now() AT TIME ZONE 'utc' - w * interval '7 days' - c.slot * interval '1 hour'
            FROM b_connectors c CROSS JOIN generate_series(0, %(days)s / 7 - 1) w
            UNION ALL
            SELECT c.id, c.type, 'message', m.id, 1, 'a***@example.org',
                   CASE WHEN a = (CASE WHEN m.i %% 20 = 0 THEN 2 WHEN m.i %% 4 = 0 THEN 1 ELSE 0 END)
                        THEN 'sent' ELSE 'failed' END,
                   m.created_at + a * interval '100 milliseconds'
            FROM b_messages m
            CROSS JOIN LATERAL generate_series(
                0, CASE WHEN m.i %% 20 = 0 THEN 2 WHEN m.i %% 4 = 0 THEN 1 ELSE 0 END) a
            JOIN b_connectors c ON c.host_n = m.host_n AND c.slot = a
        ) history
        ORDER BY created_at
        """,
    ]
    params = {"hosts": hosts, "messages": messages, "days": days}
    with conn.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement, params if "%(" in statement else None)
    conn.commit()
    conn.autocommit = True
    try:
        conn.execute("VACUUM ANALYZE")  # as autovacuum leaves a table after a bulk load
    finally:
        conn.autocommit = False


@dataclass
class Writer:
    """One connection writing as the service does, in a loop, each transaction timed."""

    url: str
    connectors: list[Any]
    recent: list[Any]
    old: list[Any]
    times: dict[str, list[float]] = field(default_factory=lambda: {"insert": [], "recent": [], "old": []})
    stop: threading.Event = field(default_factory=threading.Event)
    pid: int = 0

    def run(self) -> None:
        pace = 3 / WRITER_RATE
        with psycopg.connect(self.url) as conn:
            self.pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            conn.commit()
            while not self.stop.is_set():
                began = time.perf_counter()
                self._timed(
                    conn,
                    "insert",
                    "INSERT INTO delivery_attempts (id, connector_id, connector_type, kind, status, created_at, "
                    "finished_at) VALUES (gen_random_uuid(), %s, 'email', 'check', 'verified', "
                    "now() AT TIME ZONE 'utc', now() AT TIME ZONE 'utc')",
                    random.choice(self.connectors),
                )
                self._timed(
                    conn,
                    "recent",
                    "UPDATE messages SET updated_at = now() AT TIME ZONE 'utc' WHERE id = %s",
                    random.choice(self.recent),
                )
                self._timed(
                    conn,
                    "old",
                    "UPDATE messages SET updated_at = updated_at WHERE id = %s",
                    random.choice(self.old),
                )
                time.sleep(max(pace - (time.perf_counter() - began), 0))

    def _timed(self, conn: psycopg.Connection, name: str, statement: str, value: Any) -> None:
        started = time.perf_counter()
        conn.execute(statement, (value,))
        conn.commit()
        self.times[name].append(time.perf_counter() - started)


@dataclass
class LockWaits:
    """What the server says the writer waits for, sampled every SAMPLE_SECONDS from another connection: how
    often its backend waited on a lock (a row, a tuple, a transaction), and the longest such wait, bounded from
    above by the samples on either side that saw it not waiting."""

    longest: float = 0.0
    samples: int = 0
    waiting: int = 0
    # Every wait the samples saw the writer in ("IO:WALSync", "LWLock:WALWrite", ...): what its slow moments were.
    events: Counter[str] = field(default_factory=Counter)


SAMPLE_SECONDS = 0.002


def _watch(url: str, writer: Writer, stop: threading.Event, waits: LockWaits) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        free_at = time.perf_counter()
        began: float | None = None
        while not stop.is_set():
            if writer.pid:
                row = conn.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s", (writer.pid,)
                ).fetchone() or (None, None)
                locked = row[0] == "Lock"
                if row[0] and row[0] != "Client":  # Client: idle between its statements
                    waits.events[f"{row[0]}:{row[1]}"] += 1
                waits.samples += 1
                now = time.perf_counter()
                if locked:
                    waits.waiting += 1
                    began = began or free_at
                else:
                    if began is not None:
                        waits.longest = max(waits.longest, now - began)
                    began, free_at = None, now
            time.sleep(SAMPLE_SECONDS)


@contextmanager
def writing(writer: Writer) -> Iterator[LockWaits]:
    writer.stop.clear()
    writer.pid = 0
    for values in writer.times.values():
        values.clear()
    waits = LockWaits()
    threads = [
        threading.Thread(target=writer.run, name="writer"),
        threading.Thread(target=_watch, args=(writer.url, writer, writer.stop, waits), name="lock watch"),
    ]
    for thread in threads:
        thread.start()
    try:
        yield waits
    finally:
        writer.stop.set()
        for thread in threads:
            thread.join()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * share), len(ordered) - 1)]


def _count(conn: psycopg.Connection) -> tuple[int, int]:
    return (
        conn.execute("SELECT count(*) FROM messages").fetchone()[0],
        conn.execute("SELECT count(*) FROM delivery_attempts").fetchone()[0],
    )


def _plans(app: Any) -> list[str]:
    """EXPLAIN ANALYZE of the prune's questions, as the service sends them, on the backlog (rolled back)."""
    from datetime import timedelta

    from sqlalchemy import select

    from app.extensions import db
    from app.messages.models import Message
    from app.sweep import PRUNE_BATCH, PRUNE_CONNECTORS, _connectors_with_old_probes, _prunable_probes
    from app.timeutil import db_now

    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        captured.append((statement, parameters))

    lines: list[str] = []
    with app.app_context():
        cutoff = db_now() - timedelta(days=90)
        event.listen(db.engine, "before_cursor_execute", capture)
        try:
            db.session.scalars(
                select(Message.id)
                .where(Message.finished_at < cutoff)
                .order_by(Message.finished_at)
                .limit(PRUNE_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
            flagged = _connectors_with_old_probes(cutoff)
            _prunable_probes(flagged[0], cutoff, PRUNE_BATCH)
        finally:
            event.remove(db.engine, "before_cursor_execute", capture)
        connection = db.session.connection()
        shown = set()
        for statement, parameters in captured:
            if "FROM messages" in statement:
                name = "a batch of messages"
            elif "FROM connectors" in statement:
                name = f"connectors with an old test or check, of {PRUNE_CONNECTORS:,} from a random key"
            elif "OFFSET" in statement:
                name = "a connector's 20th newest test or check"
            else:
                name = "its tests and checks to delete"
            if name in shown:  # the window's second part, when it wrapped around
                continue
            shown.add(name)
            lines.append(f"-- {name}")
            lines += [row[0] for row in connection.exec_driver_sql(f"EXPLAIN ANALYZE {statement}", parameters)]
        db.session.rollback()
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.retention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connectors", type=int, default=CONNECTORS)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--days", type=int, default=DAYS)
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    database = Database()
    try:
        env = {
            "APP_ENV": "production",
            "LOG_LEVEL": "WARNING",
            "DATABASE_URL": database.url,
            "JWT_SECRET_KEY": secrets.token_hex(32),
            "MASTER_KEY": secrets.token_hex(32),
            "INSTANCE_PATH": tempfile.mkdtemp(prefix="bench-retention-"),
        }
        from flask_migrate import upgrade

        from app import create_app
        from app.extensions import db, init_migrations
        from app.sweep import PRUNE_BATCH, PRUNE_BATCHES, prune_attempts, prune_messages

        app = create_app(env=env)
        init_migrations(app)
        with app.app_context():
            upgrade(directory=str(ROOT / "migrations"))
        log(f"seeding {args.connectors:,} connectors, {args.messages:,} messages over {args.days} days")
        started = time.perf_counter()
        with database.connect() as conn:
            _seed(conn, args.connectors, args.messages, args.days)
            messages_before, attempts_before = _count(conn)
            kinds = dict(conn.execute("SELECT kind, count(*) FROM delivery_attempts GROUP BY kind").fetchall())
            connectors = [row[0] for row in conn.execute("SELECT id FROM connectors")]
            recent = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM messages WHERE finished_at > now() AT TIME ZONE 'utc' - interval '10 days' "
                    "ORDER BY random() LIMIT 5000"
                )
            ]
            old = [
                row[0]
                for row in conn.execute(
                    "SELECT id FROM messages WHERE finished_at < now() AT TIME ZONE 'utc' - interval '91 days' "
                    "ORDER BY random() LIMIT 5000"
                )
            ]
        log(
            f"seeded in {time.perf_counter() - started:.0f} s: {messages_before:,} messages, "
            f"{attempts_before:,} attempts ({', '.join(f'{k} {v:,}' for k, v in sorted(kinds.items()))})"
        )
        plans = _plans(app)
        writer = Writer(database.url, connectors, recent, old)

        log(f"writer alone, {WRITER_SECONDS:g} s")
        with writing(writer):
            time.sleep(WRITER_SECONDS)
        alone = {name: list(values) for name, values in writer.times.items()}

        transactions: list[float] = []
        opened: list[float] = []

        def on_begin(_conn: Any) -> None:
            opened.append(time.perf_counter())

        def on_commit(_conn: Any) -> None:
            if opened:
                transactions.append(time.perf_counter() - opened.pop())

        sweeps: list[tuple[float, int, int]] = []
        with app.app_context():
            engine = db.engine
            event.listen(engine, "begin", on_begin)
            event.listen(engine, "commit", on_commit)
            log("pruning, sweep after sweep, beside the writer")
            with writing(writer) as lock_waits:
                prune_started = time.perf_counter()
                while True:
                    began = time.perf_counter()
                    messages, attempts = prune_messages(), prune_attempts()
                    sweeps.append((time.perf_counter() - began, messages, attempts))
                    if not messages and not attempts:
                        break
                prune_seconds = time.perf_counter() - prune_started
            during = {name: list(values) for name, values in writer.times.items()}
            batch_transactions = list(transactions)
            event.remove(engine, "begin", on_begin)
            event.remove(engine, "commit", on_commit)

            with database.connect() as conn:
                messages_after, attempts_after = _count(conn)
                writer_rows = len(alone["insert"]) + len(during["insert"])
                # A minute's margin: the history goes on crossing the cutoff while this is counted.
                left_old = conn.execute(
                    "SELECT count(*) FROM messages "
                    "WHERE finished_at < now() AT TIME ZONE 'utc' - interval '90 days 1 minute'"
                ).fetchone()[0]
                over_kept = conn.execute(
                    """
                    SELECT count(*) FROM (
                        SELECT created_at,
                               row_number() OVER (PARTITION BY connector_id ORDER BY created_at DESC) AS n
                        FROM delivery_attempts WHERE kind IN ('test', 'check')
                    ) ranked WHERE n > 20 AND created_at < now() AT TIME ZONE 'utc' - interval '90 days 1 minute'
                    """
                ).fetchone()[0]

            log(f"writer alone again, {WRITER_SECONDS:g} s")
            with writing(writer):
                time.sleep(WRITER_SECONDS)
            after = {name: list(values) for name, values in writer.times.items()}
            idle_sweeps = []
            idle_rows = 0
            for _ in range(20):
                time.sleep(0.5)
                began = time.perf_counter()
                idle_rows += prune_messages() + prune_attempts()
                idle_sweeps.append(time.perf_counter() - began)
    finally:
        database.drop()

    deleted_messages = messages_before - messages_after
    deleted_attempts = attempts_before + writer_rows - attempts_after
    working = [s for s in sweeps if s[1] or s[2]]
    print(f"\nhistory: {messages_before:,} messages, {attempts_before:,} attempts, {args.connectors:,} connectors")
    print(f"settings: defaults (90 days), {PRUNE_BATCH:,} rows a batch, {PRUNE_BATCHES} batches a sweep of each")
    print(
        f"deleted: {deleted_messages:,} messages and {deleted_attempts:,} attempts in {prune_seconds:.1f} s "
        f"({len(working)} sweeps back to back): {(deleted_messages + deleted_attempts) / prune_seconds:,.0f} rows/s"
    )
    print(f"left behind: {left_old} messages past retention, {over_kept} tests/checks past retention beyond 20")
    print(
        f"one batch transaction: median {ms(statistics.median(batch_transactions))}, "
        f"p99 {ms(percentile(batch_transactions, 0.99))}, max {ms(max(batch_transactions))} "
        f"({len(batch_transactions)} transactions)"
    )
    sweep_times = [s[0] for s in working]
    print(
        f"one sweep's prune while there is a backlog: median {ms(statistics.median(sweep_times))}, "
        f"max {ms(max(sweep_times))}; once it is gone: median {ms(statistics.median(idle_sweeps))} "
        f"({idle_rows} rows in 20 sweeps)"
    )
    print("\nwriter transaction | alone: median | pruning: median, p99, max | max / alone median | n alone, pruning")
    for name, label in (
        ("insert", "insert a check"),
        ("recent", "update a recent message"),
        ("old", "update a message being pruned"),
    ):
        base = statistics.median(alone[name] + after[name])
        busy = during[name]
        print(
            f"{label} | {ms(base)} | {ms(statistics.median(busy))}, {ms(percentile(busy, 0.99))}, {ms(max(busy))} | "
            f"{max(busy) / base:.1f} | {len(alone[name]) + len(after[name])}, {len(busy)}"
        )
    print(
        f"the writer's backend waiting on a lock while the prune ran: {lock_waits.waiting} of {lock_waits.samples} "
        f"samples ({SAMPLE_SECONDS * 1000:g} ms apart), the longest at most {ms(lock_waits.longest)}"
    )
    seen = ", ".join(f"{name} {count}" for name, count in lock_waits.events.most_common(8)) or "none"
    print(f"what the samples saw the writer wait on while the prune ran: {seen}")
    print("\nplans:")
    print("\n".join(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
