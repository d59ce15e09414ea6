"""Liveness and readiness; neither needs a token.

Readiness must answer within a probe's timeout (Kubernetes' default is one second), so it asks no worker
anything: a Celery broadcast (`inspect().active_queues()`) waits out its whole timeout for replies, since it
cannot know how many workers exist. Instead every worker says, every `BEAT_SECONDS`, which queues it consumes,
and readiness reads what was said within `FRESH_SECONDS`:

- with `REDIS_URL`, into one sorted set per queue in Redis (member: the worker, score: Redis' own clock), so
  every web process of every machine reads what every worker wrote, with no clock of ours to disagree;
- on the embedded defaults, into one file per worker under the instance folder's broker, which every process
  of that one machine shares, as they share the broker itself.

A worker stopping (or losing its broker connection) takes its entries back at once; one that dies without a
word is forgotten after `FRESH_SECONDS`. The beat runs on the consumer's own timer, so a worker whose consumer
is stuck stops beating too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

import redis
from celery import bootsteps
from flask import Flask, current_app
from flask.views import MethodView
from marshmallow import Schema, fields
from sqlalchemy import text

from app.extensions import Blueprint, db
from app.queues import queue_names, redis_client_options

blp = Blueprint("health", __name__, url_prefix="/api/health", description="Liveness and readiness")
log = logging.getLogger(__name__)

BEAT_SECONDS = 3.0
# Three beats missed in a row: a worker that is gone, not one whose timer ran late on a busy machine.
FRESH_SECONDS = 10.0
# Entries of workers that died without a word are removed once this old, by any beating worker.
FORGET_AFTER_SECONDS = 3600.0
REDIS_KEY = "connectors:consumers:{queue}"


class ConsumerRegistry(Protocol):
    """Which worker consumes which queue, as the workers last said."""

    def beat(self, worker: str, queues: Collection[str]) -> None: ...

    def forget(self, worker: str) -> None: ...

    def served(self) -> set[str]: ...


class RedisConsumerRegistry:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _now(self) -> float:
        seconds, microseconds = self.client.time()
        return seconds + microseconds / 1_000_000

    def beat(self, worker: str, queues: Collection[str]) -> None:
        now = self._now()
        pipe = self.client.pipeline(transaction=False)
        for queue in {*queue_names(), *queues}:
            key = REDIS_KEY.format(queue=queue)
            if queue in queues:
                pipe.zadd(key, {worker: now})
                pipe.expire(key, int(FORGET_AFTER_SECONDS))
            else:
                pipe.zrem(key, worker)  # a queue it no longer consumes (cancel_consumer)
            pipe.zremrangebyscore(key, "-inf", now - FORGET_AFTER_SECONDS)
        pipe.execute()

    def forget(self, worker: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for queue in queue_names():
            pipe.zrem(REDIS_KEY.format(queue=queue), worker)
        pipe.execute()

    def served(self) -> set[str]:
        names = queue_names()
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        for queue in names:
            pipe.zrevrange(REDIS_KEY.format(queue=queue), 0, 0, withscores=True)  # the latest beat
        (seconds, microseconds), *latest = pipe.execute()
        now = seconds + microseconds / 1_000_000
        return {queue for queue, top in zip(names, latest, strict=True) if top and now - top[0][1] <= FRESH_SECONDS}


class FileConsumerRegistry:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, worker: str) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9@._-]', '_', worker)}.json"

    def beat(self, worker: str, queues: Collection[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(worker)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps({"worker": worker, "queues": sorted(queues)}))
        os.replace(staging, path)  # readers see the old list or the new one, never half of one
        for other in self.folder.glob("*.json"):
            try:
                if time.time() - other.stat().st_mtime > FORGET_AFTER_SECONDS:
                    other.unlink()
            except FileNotFoundError:
                continue

    def forget(self, worker: str) -> None:
        self._path(worker).unlink(missing_ok=True)

    def served(self) -> set[str]:
        served: set[str] = set()
        now = time.time()
        for path in self.folder.glob("*.json"):
            try:
                if now - path.stat().st_mtime <= FRESH_SECONDS:
                    served.update(json.loads(path.read_text())["queues"])
            except (FileNotFoundError, ValueError, KeyError):
                continue  # forgotten meanwhile, or not ours
        return served


def _redis_client(app: Flask) -> redis.Redis:
    options = redis_client_options(app.config)
    return redis.Redis.from_url(app.config["REDIS_URL"], socket_connect_timeout=1, socket_timeout=1, **options)


def init_consumer_registry(app: Flask) -> None:
    """The registry of this app's broker, and the worker bootstep that writes to it (a no-op outside workers)."""
    if app.config["REDIS_URL"]:
        registry: ConsumerRegistry = RedisConsumerRegistry(_redis_client(app))
    else:
        registry = FileConsumerRegistry(Path(app.instance_path) / "broker" / "consumers")
    app.extensions["consumer_registry"] = registry

    class ConsumerBeat(bootsteps.StartStopStep):
        """Says, on the consumer's timer, which queues this worker consumes; takes it back when it stops."""

        name = "connectors.ConsumerBeat"
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, consumer: Any, **kwargs: Any) -> None:
            super().__init__(consumer, **kwargs)
            self.entry: Any = None
            self.worker = f"{consumer.hostname}:{os.getpid()}"  # two workers of one host name stay two
            self.failing = False

        def start(self, consumer: Any) -> None:
            self._cancel()
            self.beat(consumer)  # ready as soon as it consumes, not one interval later
            self.entry = consumer.timer.call_repeatedly(BEAT_SECONDS, self.beat, (consumer,), priority=10)

        def _cancel(self) -> None:
            if self.entry is not None:
                self.entry.cancel()
                self.entry = None

        def stop(self, consumer: Any) -> None:
            # Also on a lost broker connection: the consumer stops its steps, reconnects, starts them again.
            self._cancel()
            try:
                registry.forget(self.worker)
            except Exception as exc:  # Redis down: the entries go stale by themselves
                log.warning("could not withdraw this worker's queues: %s", type(exc).__name__)

        shutdown = stop

        def beat(self, consumer: Any) -> None:
            task_consumer = consumer.task_consumer
            queues = [queue.name for queue in task_consumer.queues] if task_consumer is not None else []
            try:
                registry.beat(self.worker, queues)
            except Exception as exc:
                if not self.failing:
                    log.warning("could not say which queues this worker consumes: %s", type(exc).__name__)
                self.failing = True
                return
            if self.failing:
                log.info("saying which queues this worker consumes again")
            self.failing = False

    app.extensions["celery"].steps["consumer"].add(ConsumerBeat)


class HealthSchema(Schema):
    status = fields.String(required=True)


class ReadySchema(Schema):
    status = fields.String(required=True, metadata={"description": "ok or unavailable"})
    checks = fields.Dict(keys=fields.String(), values=fields.String())


@blp.route("")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    @blp.doc(security=[])
    def get(self) -> dict:
        """Liveness: the process is up

        200 while the web process runs, whatever the state of what it depends on: it touches neither the database
        nor Redis, so a restart is never asked for because of them.
        """
        return {"status": "ok"}


def _check_database() -> str:
    try:
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
        return "ok"
    except Exception:
        db.session.rollback()
        return "down"


def _registry() -> ConsumerRegistry:
    return current_app.extensions["consumer_registry"]


def _check_redis() -> str | None:
    registry = _registry()
    if not isinstance(registry, RedisConsumerRegistry):
        return None
    try:
        registry.client.ping()
        return "ok"
    except Exception:
        return "down"


def _check_workers() -> dict[str, str]:
    try:
        served = _registry().served()
    except Exception:
        served = set()
    return {f"worker:{name}": "ok" if name in served else "down" for name in queue_names()}


@blp.route("/ready")
class Ready(MethodView):
    @blp.response(200, ReadySchema)
    @blp.alt_response(503, schema=ReadySchema, description="Something it depends on is down")
    @blp.doc(security=[])
    def get(self) -> tuple[dict, int]:
        """Readiness: the database, Redis (when configured) and a worker on every queue

        200 with every check `ok`, or 503 naming what is `down`: `worker:<queue>` for each queue no worker
        consumes. It asks no worker anything (a broadcast would wait out its timeout): each worker says every
        few seconds which queues it consumes, and this reads what was said, so it answers in milliseconds.
        """
        checks = {"database": _check_database()}
        redis_state = _check_redis()
        if redis_state:
            checks["redis"] = redis_state
        if checks.get("redis") != "down":
            checks.update(_check_workers())
        ready = all(state == "ok" for state in checks.values())
        return {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
