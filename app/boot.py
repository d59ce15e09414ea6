"""Starting a process: settings and the database checked first, and one line to act on when they are wrong.

Every entry point (the release's `flask db upgrade`, gunicorn's master, the Celery worker and beat) calls
`app_or_exit` or `check_or_exit`: a bad setting or an unreachable database prints one line naming the
variable and exits with status 1, instead of a traceback that never names it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.config import ConfigError, load_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def check_database(url: str) -> None:
    """Connect once, or raise ConfigError naming DATABASE_URL (without its password)."""
    engine = create_engine(url, connect_args={"connect_timeout": 5} if url.startswith("postgresql") else {})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        where = make_url(url).render_as_string(hide_password=True)
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"DATABASE_URL: cannot use the database at {where}: {reason}") from None
    finally:
        engine.dispose()


def _fail(error: ConfigError) -> None:
    print(f"connectors: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def check_or_exit() -> None:
    """Validate the settings and reach the database, without building the app (gunicorn's master)."""
    env = dict(os.environ)
    try:
        settings = load_settings(env, Path(env.get("INSTANCE_PATH") or PROJECT_ROOT / "instance"))
        check_database(settings["SQLALCHEMY_DATABASE_URI"])
    except ConfigError as error:
        _fail(error)


def app_or_exit(check: bool = True) -> Flask:
    """The app, built from the environment; with `check`, the database reached once first."""
    from app import create_app

    try:
        app = create_app()
        if check:
            check_database(app.config["SQLALCHEMY_DATABASE_URI"])
    except ConfigError as error:
        _fail(error)
    return app
