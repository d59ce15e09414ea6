"""Extension singletons, bound to the app in `create_app`."""

from __future__ import annotations

import json
import logging
from typing import Any

import flask_smorest
from apispec.ext.marshmallow import MarshmallowPlugin, OpenAPIConverter
from flask import Flask, Request, Response, g
from flask_jwt_extended import JWTManager
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_smorest import abort
from flask_sqlalchemy import SQLAlchemy
from marshmallow import Schema
from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase
from webargs.core import parse_json
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app.errors import ErrorEnvelopeSchema, handle_http_exception


class Base(DeclarativeBase):
    # Named constraints keep Alembic migrations identical on SQLite and PostgreSQL.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class BadRequestParser(FlaskParser):
    """The contract says validation errors are 400, not webargs' default 422; a body that is not a JSON object
    within the size limit is a 400 or 413 that says which."""

    DEFAULT_VALIDATION_STATUS = 400

    def load_json(self, req: Request, schema: Schema) -> Any:
        # webargs would treat a non-JSON body as absent and report missing fields; say what is wrong.
        if not is_json_request(req):
            abort(400, message="Content-Type must be application/json")
        # Read the body first: a chunked body has no Content-Length, and werkzeug stops reading it at
        # MAX_CONTENT_LENGTH without a word; more left to read is a 413, not bad JSON.
        raw = req.get_data(cache=True)
        limit = req.max_content_length
        if req.content_length is None and limit is not None and len(raw) >= limit and req.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
        try:
            data = parse_json(raw)
        except RecursionError:  # deeply nested JSON within the size limit
            abort(400, message="JSON body is nested too deeply")
        except (json.JSONDecodeError, UnicodeDecodeError):  # before ValueError: they are ValueErrors too
            abort(400, message="Request body is not JSON", messages={"json": ["Invalid JSON body."]})
        except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            abort(400, message="JSON body holds a number too long to read")
        try:
            # JSON may escape lone surrogates ("\udfff"); no database or provider can take them.
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            abort(400, message="JSON body contains text that is not valid Unicode")
        return data


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = BadRequestParser()


class OneOfConverter(OpenAPIConverter):
    """Documents a schema that declares `OPENAPI_ONE_OF = (property, {value: variant schema})` as a `oneOf` of
    its variants with a discriminator, while requests are still validated by the schema itself."""

    def schema2jsonschema(self, schema: Any) -> dict[str, Any]:
        cls = schema if isinstance(schema, type) else type(schema)
        one_of = cls.__dict__.get("OPENAPI_ONE_OF")  # its own attribute only: the variants subclass it
        if one_of is None:
            return super().schema2jsonschema(schema)
        prop, variants = one_of
        refs = {value: self.resolve_nested_schema(variant) for value, variant in variants.items()}
        return {
            "oneOf": list(refs.values()),
            "discriminator": {"propertyName": prop, "mapping": {value: ref["$ref"] for value, ref in refs.items()}},
        }


class SpecPlugin(MarshmallowPlugin):
    Converter = OneOfConverter


class Api(flask_smorest.Api):
    """flask-smorest's Api, answering and documenting every error with the service's one envelope."""

    ERROR_SCHEMA = ErrorEnvelopeSchema  # documented for every status, flask-smorest's own 400 and default too

    def handle_http_exception(self, error: HTTPException) -> Response:
        return handle_http_exception(error)


def rate_limit_key() -> str:
    """Limits count per Host, by its canonical uuid; a request without a valid token counts by address."""
    host_id = g.get("host_id")  # set by the view's auth check, which runs first
    return f"host:{host_id}" if host_id else f"addr:{get_remote_address()}"


# An object a request has committed is answered from memory: reading it back would need the database once
# more, and a failure then would turn a committed success into an error.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
api = Api(spec_kwargs={"marshmallow_plugin": SpecPlugin()})
jwt = JWTManager()
limiter = Limiter(key_func=rate_limit_key)


def init_extensions(app: Flask) -> None:
    db.init_app(app)
    jwt.init_app(app)
    limiter.init_app(app)
    api.init_app(app)


def init_migrations(app: Flask) -> None:
    """Flask-Migrate, set up only where migrations run (`flask db ...`, the tests).

    It imports Alembic, Mako and Pygments: about 10 MiB in every web and worker process, which never migrate.
    """
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at import
    from flask_migrate import Migrate

    if "migrate" not in app.extensions:
        Migrate(app, db, directory=str(app.config["MIGRATIONS_DIR"]), compare_type=True)
