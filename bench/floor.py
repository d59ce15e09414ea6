"""The floor of the CRUD figure: bare Flask endpoints answering the service's own JSON from memory.

Served by the Procfile's gunicorn command line with `wsgi:app` replaced by `bench.floor:app`. The bodies
are answers the service gave in the same run, read once from the file named by BENCH_FLOOR_BODIES.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

BODIES: dict[str, Any] = json.loads(Path(os.environ["BENCH_FLOOR_BODIES"]).read_text())

app = Flask(__name__)


@app.get("/api/connectors")
def list_connectors() -> ResponseReturnValue:
    return jsonify(BODIES["list"])


@app.post("/api/connectors")
def create_connector() -> ResponseReturnValue:
    request.get_data()  # the body is read, as the service reads it, then ignored
    return jsonify(BODIES["one"]), 201


@app.put("/api/connectors/<connector_id>")
def update_connector(connector_id: str) -> ResponseReturnValue:
    request.get_data()
    return jsonify(BODIES["one"])


@app.get("/api/health")
def health() -> ResponseReturnValue:
    return jsonify(status="ok")
