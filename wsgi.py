"""Entry point for gunicorn (`wsgi:app`) and the flask CLI (`flask --app wsgi ...`)."""

from app.boot import app_or_exit

app = app_or_exit()
