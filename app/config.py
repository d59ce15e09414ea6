"""Settings, read from the environment once at start and validated there."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

log = logging.getLogger(__name__)

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message names the variable."""


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, not {raw!r}")
    return value


def _rate_limit(env: Mapping[str, str], name: str, default: str) -> str:
    """A rate limit in flask-limiter's notation ("600 per minute", "10/second;1000/hour")."""
    from limits import parse_many

    raw = env.get(name, "").strip() or default
    try:
        parse_many(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a rate limit such as '600 per minute', not {raw!r}") from None
    return raw


def _public_base_url(env: Mapping[str, str], production: bool) -> str | None:
    """Where providers and people reach this service (receipts' callbacks, acknowledgement links)."""
    raw = env.get("PUBLIC_BASE_URL", "").strip().rstrip("/")
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError("PUBLIC_BASE_URL must be an https:// address such as https://connectors.example.org")
    if production and parts.scheme != "https":
        raise ConfigError("PUBLIC_BASE_URL must be https:// when APP_ENV=production")
    return raw


def _master_key(name: str, raw: str) -> bytes:
    raw = raw.strip()
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{name} must be 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`")
    return key


def database_url(raw: str | None, instance_path: Path) -> str:
    """The SQLAlchemy URL for DATABASE_URL (SQLite in the instance folder when unset)."""
    if not raw:
        return f"sqlite:///{instance_path / 'connectors.sqlite3'}"
    # Heroku still hands out the scheme SQLAlchemy 2 no longer accepts.
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://") :]
    if raw.startswith("postgresql://"):
        raw = "postgresql+psycopg://" + raw[len("postgresql://") :]
    try:
        url = make_url(raw)
        url.port  # noqa: B018 - a port that is not a number fails here, not at the first connection
    except (ArgumentError, ValueError):
        raise ConfigError(
            "DATABASE_URL is not a database URL (expected postgresql://user:password@host:port/name)"
        ) from None
    if url.get_backend_name() not in {"postgresql", "sqlite"}:
        raise ConfigError(f"DATABASE_URL must be a postgresql:// (or sqlite://) URL, not {url.get_backend_name()}://")
    return raw


def engine_options(url: str, pool_size: int) -> dict[str, Any]:
    options: dict[str, Any] = {
        # Threads that share a process (gunicorn threads, the worker's pool) each need a connection now and
        # then; too small a pool makes them queue, and its overflow opens and closes a connection per use.
        "pool_size": pool_size,
        "max_overflow": 10,
        # A connection the server closed (restart, failover, idle timeout) is replaced before use.
        "pool_pre_ping": True,
        # A request waits at most this long for a connection, then answers 503 rather than hanging.
        "pool_timeout": 10,
    }
    if url.startswith("postgresql"):
        # An unreachable server (a dropped route, a firewall) fails in seconds, not after the OS's minutes.
        options["connect_args"] = {"connect_timeout": 5}
    return options


def _local_secrets(instance_path: Path) -> dict[str, str]:
    """Development secrets generated once and shared by every local process."""
    path = instance_path / "secrets.json"
    instance_path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another process may be writing it right now
            text = path.read_text()
            if text.strip():
                return json.loads(text)
            time.sleep(0.05)
        raise ConfigError(f"{path} is empty: delete it and start again") from None
    generated = {"JWT_SECRET_KEY": secrets.token_hex(32), "MASTER_KEY": secrets.token_hex(32)}
    with os.fdopen(fd, "w") as handle:
        json.dump(generated, handle)
    log.warning(
        "generated development JWT_SECRET_KEY and MASTER_KEY into %s; set them in the environment in production",
        path,
    )
    return generated


def load_settings(env: Mapping[str, str], instance_path: Path) -> dict[str, Any]:
    """Flask config keys for this service, from `env`. Raises ConfigError naming the bad variable."""
    app_env = env.get("APP_ENV", "development").strip().lower()
    production = app_env == "production"

    jwt_secret = env.get("JWT_SECRET_KEY", "").strip()
    master_raw = env.get("MASTER_KEY", "").strip()
    if production:
        for name, value in (("JWT_SECRET_KEY", jwt_secret), ("MASTER_KEY", master_raw)):
            if not value:
                raise ConfigError(f"{name} is not set; it is required when APP_ENV=production")
    elif not jwt_secret or not master_raw:
        if env.get("DATABASE_URL", "").strip():
            # Generated keys live in one machine's instance folder: fine for the embedded SQLite default,
            # fatal for a shared database that other processes (or the next deploy) must also open.
            missing = "JWT_SECRET_KEY" if not jwt_secret else "MASTER_KEY"
            raise ConfigError(f"{missing} is not set; it is required whenever DATABASE_URL is set")
        generated = _local_secrets(instance_path)
        jwt_secret = jwt_secret or generated["JWT_SECRET_KEY"]
        master_raw = master_raw or generated["MASTER_KEY"]
    if len(jwt_secret) < 32:
        raise ConfigError("JWT_SECRET_KEY must be at least 32 characters")

    master_key = _master_key("MASTER_KEY", master_raw)
    old_keys = [
        _master_key("OLD_MASTER_KEYS", part) for part in env.get("OLD_MASTER_KEYS", "").split(",") if part.strip()
    ]

    redis_url = env.get("REDIS_URL", "").strip() or None
    if redis_url and not redis_url.startswith(("redis://", "rediss://")):
        raise ConfigError("REDIS_URL must start with redis:// or rediss://")
    redis_cert_reqs = env.get("REDIS_SSL_CERT_REQS", "required").strip().lower()
    if redis_cert_reqs not in {"required", "optional", "none"}:
        raise ConfigError("REDIS_SSL_CERT_REQS must be required, optional or none")

    test_timeout = _number(env, "TEST_DELIVERY_TIMEOUT", 20.0, 1.0, 300.0)
    provider_timeout = _number(env, "PROVIDER_TIMEOUT", min(10.0, test_timeout / 2), 0.1, 300.0)
    if provider_timeout >= test_timeout:
        raise ConfigError("PROVIDER_TIMEOUT must be below TEST_DELIVERY_TIMEOUT")

    webhook_url = env.get("EVENTS_WEBHOOK_URL", "").strip() or None
    webhook_secret = env.get("EVENTS_WEBHOOK_SECRET", "").strip() or None
    if webhook_url:
        parts = urlsplit(webhook_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError("EVENTS_WEBHOOK_URL must be an http:// or https:// URL")
        if not webhook_secret:
            raise ConfigError("EVENTS_WEBHOOK_SECRET is not set; it is required with EVENTS_WEBHOOK_URL")
    if webhook_secret:
        try:
            if not webhook_secret.startswith("whsec_") or len(base64.b64decode(webhook_secret[6:], validate=True)) < 24:
                raise ValueError
        except ValueError:
            raise ConfigError("EVENTS_WEBHOOK_SECRET must be whsec_ and base64 of 24 to 64 random bytes") from None

    log_level = env.get("LOG_LEVEL", "INFO").strip().upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")

    database = database_url(env.get("DATABASE_URL", "").strip(), instance_path)
    embedded = not env.get("DATABASE_URL", "").strip()
    return {
        "APP_ENV": app_env,
        "EMBEDDED": embedded,
        "SQLALCHEMY_DATABASE_URI": database,
        "SQLALCHEMY_ENGINE_OPTIONS": engine_options(database, int(_number(env, "DB_POOL_SIZE", 20, 1, 1000))),
        "REDIS_URL": redis_url,
        "REDIS_SSL_CERT_REQS": redis_cert_reqs,
        "JWT_SECRET_KEY": jwt_secret,
        "MASTER_KEY": master_key,
        "OLD_MASTER_KEYS": old_keys,
        "TEST_DELIVERY_TIMEOUT": test_timeout,
        "PROVIDER_TIMEOUT": provider_timeout,
        # On a laptop's embedded defaults, the development mail sink on 127.0.0.1 must be reachable.
        "ALLOW_PRIVATE_DESTINATIONS": _bool(env, "ALLOW_PRIVATE_DESTINATIONS", embedded and not production),
        "TEST_WAITS_PER_PROCESS": int(_number(env, "TEST_WAITS_PER_PROCESS", 8, 1, 10_000)),
        "SWEEP_INTERVAL": _number(env, "SWEEP_INTERVAL", 15.0, 0.5, 3600.0),
        "CONNECTOR_CHECK_INTERVAL": _number(env, "CONNECTOR_CHECK_INTERVAL", 86400.0, 1.0, 365 * 86400.0),
        "CONNECTOR_CHECK_CONCURRENCY": int(_number(env, "CONNECTOR_CHECK_CONCURRENCY", 10, 1, 10_000)),
        "EVENTS_WEBHOOK_URL": webhook_url,
        "EVENTS_WEBHOOK_SECRET": webhook_secret,
        "EVENTS_RETRY_BASE": _number(env, "EVENTS_RETRY_BASE", 1.0, 0.1, 3600.0),
        # A receiver's whole answer to one event; its own, not PROVIDER_TIMEOUT: receivers are our services,
        # and a slow one must still get its events through (common webhook senders wait about 15 s).
        "EVENTS_TIMEOUT": _number(env, "EVENTS_TIMEOUT", 15.0, 0.1, 300.0),
        "EVENTS_RETENTION": _number(env, "EVENTS_RETENTION", 30 * 86400.0, 86400.0, 3650 * 86400.0),
        "MESSAGE_RETENTION": _number(env, "MESSAGE_RETENTION", 90 * 86400.0, 86400.0, 3650 * 86400.0),
        "ATTEMPT_RETENTION": _number(env, "ATTEMPT_RETENTION", 90 * 86400.0, 86400.0, 3650 * 86400.0),
        "DISPATCH_RETRY_BASE": _number(env, "DISPATCH_RETRY_BASE", 30.0, 0.1, 3600.0),
        "DISPATCH_RETRY_MAX": _number(env, "DISPATCH_RETRY_MAX", 3600.0, 0.1, 86400.0),
        "DISPATCH_LIMIT": _rate_limit(env, "DISPATCH_LIMIT", "600 per minute"),
        "PUBLIC_BASE_URL": _public_base_url(env, production),
        "DISPATCH_HOST_CONCURRENCY": int(_number(env, "DISPATCH_HOST_CONCURRENCY", 10, 1, 10_000)),
        "TWILIO_API_BASE_URL": env.get("TWILIO_API_BASE_URL", "https://api.twilio.com").rstrip("/"),
        "WHATSAPP_API_BASE_URL": env.get("WHATSAPP_API_BASE_URL", "https://graph.facebook.com").rstrip("/"),
        "TELEGRAM_API_BASE_URL": env.get("TELEGRAM_API_BASE_URL", "https://api.telegram.org").rstrip("/"),
        "MAX_CONTENT_LENGTH": int(_number(env, "MAX_BODY_BYTES", 64 * 1024, 1024, 10 * 1024 * 1024)),
        "LOG_LEVEL": log_level,
    }
