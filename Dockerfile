FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PORT=8000
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY wsgi.py celery_app.py gunicorn.conf.py Procfile ./
RUN pip install --no-cache-dir . && useradd --system --home /srv connectors && chown -R connectors /srv
USER connectors
EXPOSE 8000
CMD ["gunicorn", "wsgi:app"]
