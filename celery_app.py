"""Entry point for `celery -A celery_app worker` and `celery -A celery_app beat`."""

from app.boot import app_or_exit

flask_app = app_or_exit()
celery_app = flask_app.extensions["celery"]
celery_app.conf.include = ["worker.tasks"]  # the tasks live in the worker only; the web sends them by name
