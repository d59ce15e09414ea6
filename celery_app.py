"""Entry point for `celery -A celery_app worker` and `celery -A celery_app beat`."""

from app.boot import app_or_exit
from app.logs import configure_celery_process_logging

configure_celery_process_logging()  # every line JSON, from the first (reading the settings may warn)
flask_app = app_or_exit()
celery_app = flask_app.extensions["celery"]
celery_app.conf.include = ["worker.tasks"]  # the tasks live in the worker only; the web sends them by name
