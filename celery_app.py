"""Entry point for `celery -A celery_app worker`."""

from typing import Any

from celery.signals import worker_process_init

from app import create_app, db

flask_app = create_app()
celery_app = flask_app.extensions["celery"]


@worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    # A forked pool process must not share the parent's database sockets.
    with flask_app.app_context():
        db.engine.dispose()
