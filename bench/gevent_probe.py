"""A gunicorn config for figure 7's check of gevent: the project's own gunicorn.conf.py, plus a hook that runs
inside each real worker, after gevent patched it and the app was loaded, and asks whether the libraries the
web process waits on yield to other greenlets while they wait.

`gunicorn -k gevent -c <this file> wsgi:app`, from the checkout's folder, with BENCH_PROBE_OUT naming a folder:
each worker writes `probe-<pid>.json` there. For each of psycopg (connect, then `SELECT pg_sleep`) and redis
(`BLPOP` with a timeout, over TLS when REDIS_URL is rediss://), it runs PROBE_GREENLETS waits of PROBE_SECONDS
at once next to a greenlet ticking every 10 ms: waits that yield take about PROBE_SECONDS in all and the
ticker keeps ticking; waits that block the process take PROBE_GREENLETS times as long and the ticker stalls.
Each is done three times; the round of median wall time is reported.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROBE_GREENLETS = int(os.environ.get("BENCH_PROBE_GREENLETS", "5"))
PROBE_SECONDS = float(os.environ.get("BENCH_PROBE_SECONDS", "0.3"))

_project_conf = Path(os.environ.get("BENCH_GUNICORN_CONF", "gunicorn.conf.py"))
exec(compile(_project_conf.read_text(), str(_project_conf), "exec"))  # noqa: S102 - the project's own settings


ROUNDS = 3


def _median_round(wait: Any) -> dict[str, Any]:
    """ROUNDS rounds of `_concurrently`: the one of median wall time (a busy machine can stall one round)."""
    rounds = sorted((_concurrently(wait) for _ in range(ROUNDS)), key=lambda found: found["wall_s"])
    return {**rounds[len(rounds) // 2], "walls_s": [found["wall_s"] for found in rounds]}


def _concurrently(wait: Any) -> dict[str, Any]:
    import gevent

    ticks = 0
    running = True

    def ticker() -> None:
        nonlocal ticks
        while running:
            gevent.sleep(0.01)
            ticks += 1

    clock = gevent.spawn(ticker)
    started = time.monotonic()
    errors: list[str] = []

    def one() -> None:
        try:
            wait()
        except Exception as exc:  # reported, not raised: the figure says what broke
            errors.append(f"{type(exc).__name__}: {exc}"[:300])

    gevent.joinall([gevent.spawn(one) for _ in range(PROBE_GREENLETS)])
    wall = time.monotonic() - started
    running = False
    clock.join()
    serial = PROBE_GREENLETS * PROBE_SECONDS
    return {
        "wall_s": round(wall, 3),
        "serial_s": serial,
        "ticks": ticks,
        "ticks_if_yielding": int(wall / 0.01),
        "yields": not errors and wall < (PROBE_SECONDS + serial) / 2,
        "errors": errors,
    }


def post_worker_init(worker: Any) -> None:
    from gevent import monkey

    result: dict[str, Any] = {
        "pid": os.getpid(),
        "worker_class": type(worker).__name__,
        "patched": {name: monkey.is_module_patched(name) for name in ("socket", "select", "ssl", "threading")},
    }
    try:
        import psycopg
        import redis
        from psycopg import waiting

        result["psycopg_wait"] = waiting.wait.__name__
        url = os.environ["DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://", 1)

        def database_wait() -> None:
            with psycopg.connect(url, connect_timeout=5) as conn:
                conn.execute("SELECT pg_sleep(%s)", (PROBE_SECONDS,))

        def redis_wait() -> None:
            options = {}
            if os.environ["REDIS_URL"].startswith("rediss://"):
                options["ssl_cert_reqs"] = os.environ.get("REDIS_SSL_CERT_REQS", "required")
            client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=10, **options)
            client.blpop(["bench:probe:never"], timeout=PROBE_SECONDS)
            client.close()

        result["psycopg"] = _median_round(database_wait)
        result["redis"] = _median_round(redis_wait)
        result["redis_tls"] = os.environ["REDIS_URL"].startswith("rediss://")
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    folder = Path(os.environ["BENCH_PROBE_OUT"])
    (folder / f"probe-{os.getpid()}.json").write_text(json.dumps(result))
    print(f"bench probe: {json.dumps(result)}", file=sys.stderr, flush=True)
