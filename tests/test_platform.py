"""Settings, sealed secrets and key rotation, migrations, and the OpenAPI document."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from app import create_app
from app.config import ConfigError, database_url
from tests.conftest import ROOT, SMTP_PASSWORD, create_connector

# --- settings ---------------------------------------------------------------------------------------------


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"INSTANCE_PATH": str(tmp_path), **values}


@pytest.mark.parametrize("missing", ["JWT_SECRET_KEY", "MASTER_KEY"])
def test_production_refuses_to_start_without_its_secrets_and_names_the_variable(tmp_path, missing):
    env = _env(tmp_path, APP_ENV="production", JWT_SECRET_KEY="j" * 40, MASTER_KEY="22" * 32)
    del env[missing]
    with pytest.raises(ConfigError, match=missing):
        create_app(env=env)


def test_production_refusal_is_a_clear_exit_of_the_cli(tmp_path):
    env = {"PATH": str(Path(sys.executable).parent), "APP_ENV": "production", "INSTANCE_PATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "db", "current"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "JWT_SECRET_KEY is not set" in result.stderr


@pytest.mark.parametrize("missing", ["JWT_SECRET_KEY", "MASTER_KEY"])
def test_secrets_are_never_generated_for_a_shared_database(tmp_path, missing):
    env = _env(tmp_path, JWT_SECRET_KEY="j" * 40, MASTER_KEY="22" * 32, DATABASE_URL="postgresql://db/connectors")
    del env[missing]
    with pytest.raises(ConfigError, match=f"{missing} is not set; it is required whenever DATABASE_URL is set"):
        create_app(env=env)
    assert not (tmp_path / "secrets.json").exists()


def test_development_generates_secrets_once_and_reuses_them(tmp_path, caplog):
    first = create_app(env=_env(tmp_path))
    assert "generated development JWT_SECRET_KEY and MASTER_KEY" in caplog.text
    second = create_app(env=_env(tmp_path))
    assert first.config["JWT_SECRET_KEY"] == second.config["JWT_SECRET_KEY"]
    assert first.config["MASTER_KEY"] == second.config["MASTER_KEY"]
    assert (tmp_path / "secrets.json").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MASTER_KEY", "abc"),
        ("OLD_MASTER_KEYS", "33" * 32 + ",zz"),
        ("JWT_SECRET_KEY", "short"),
        ("TEST_DELIVERY_TIMEOUT", "soon"),
        ("PROVIDER_TIMEOUT", "30"),
        ("ALLOW_PRIVATE_DESTINATIONS", "perhaps"),
        ("REDIS_URL", "http://redis"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_malformed_settings_fail_fast_naming_the_variable(tmp_path, variable, value):
    env = _env(tmp_path, JWT_SECRET_KEY="j" * 40, MASTER_KEY="22" * 32)
    env[variable] = value
    with pytest.raises(ConfigError, match=variable):
        create_app(env=env)


def test_rediss_urls_carry_the_documented_certificate_setting_to_every_redis_client(tmp_path):
    import ssl

    env = _env(tmp_path, JWT_SECRET_KEY="j" * 40, MASTER_KEY="22" * 32, REDIS_URL="rediss://:pw@redis.example:6380")
    strict = create_app(env=env)
    assert strict.config["CELERY"]["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert strict.config["RATELIMIT_STORAGE_OPTIONS"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    heroku = create_app(env={**env, "REDIS_SSL_CERT_REQS": "none"})
    assert heroku.config["CELERY"]["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert heroku.config["RATELIMIT_STORAGE_OPTIONS"] == {"ssl_cert_reqs": ssl.CERT_NONE}
    plain = create_app(env={**env, "REDIS_URL": "redis://redis.example:6379/0"})
    assert "broker_use_ssl" not in plain.config["CELERY"] and plain.config["RATELIMIT_STORAGE_OPTIONS"] == {}


def test_heroku_postgres_urls_are_accepted(tmp_path):
    assert database_url("postgres://u:p@h:5432/d", tmp_path) == "postgresql+psycopg://u:p@h:5432/d"
    assert database_url("postgresql://u@h/d", tmp_path) == "postgresql+psycopg://u@h/d"
    assert database_url(None, tmp_path).startswith("sqlite:///")


# --- sealing and rotation -----------------------------------------------------------------------------------


def test_a_sealed_config_does_not_open_on_another_row(app, client, host):
    from app.connectors import service
    from app.connectors.models import Connector
    from app.crypto import SealError
    from app.extensions import db

    first = create_connector(client, host, "email", "one")
    second = create_connector(client, host, "email", "two")
    with app.app_context():
        a = db.session.get(Connector, uuid.UUID(first["id"]))
        b = db.session.get(Connector, uuid.UUID(second["id"]))
        assert service.open_config(a)["password"] == SMTP_PASSWORD
        b.config_sealed, b.config_key_id = a.config_sealed, a.config_key_id
        with pytest.raises(SealError):
            service.open_config(b)
        db.session.rollback()


def test_rotation_old_keys_still_open_and_reseal_moves_every_row_to_the_new_key(app, client, host, service_env):
    from app.connectors import service
    from app.connectors.models import Connector
    from app.crypto import SealError
    from app.extensions import db

    created = [create_connector(client, host, kind) for kind in ("email", "sms", "telegram")]
    new_key = "44" * 32
    rotated = create_app(env={**service_env, "MASTER_KEY": new_key, "OLD_MASTER_KEYS": service_env["MASTER_KEY"]})
    with rotated.app_context():
        row = db.session.get(Connector, uuid.UUID(created[0]["id"]))
        assert service.open_config(row)["password"] == SMTP_PASSWORD  # opened with the old key
        db.session.rollback()

    result = rotated.test_cli_runner().invoke(args=["reseal-configs"])
    assert result.exit_code == 0 and "re-sealed 3 connector(s)" in result.output

    with rotated.app_context():  # a row no key opens is reported, and does not stop the others
        stray = db.session.get(Connector, uuid.UUID(created[1]["id"]))
        stray.config_key_id = "0" * 16
        db.session.commit()
    stuck = rotated.test_cli_runner().invoke(args=["reseal-configs"])
    assert stuck.exit_code == 1 and created[1]["id"] in stuck.output
    with rotated.app_context():
        stray = db.session.get(Connector, uuid.UUID(created[1]["id"]))
        stray.config_key_id = rotated.extensions["keyring"].current_id
        db.session.commit()

    only_new = create_app(env={**service_env, "MASTER_KEY": new_key})
    with only_new.app_context():
        rows = db.session.query(Connector).all()
        assert {r.config_key_id for r in rows} == {only_new.extensions["keyring"].current_id}
        assert service.open_config(rows[0])  # opens without the old key
    with app.app_context():  # the old key alone no longer opens them
        with pytest.raises(SealError):
            service.open_config(db.session.query(Connector).first())
        db.session.rollback()


# --- migrations ---------------------------------------------------------------------------------------------


def test_models_and_migrations_agree(app):
    from app.extensions import db

    with app.app_context(), db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), db.metadata)
    assert differences == []


def test_migrations_are_at_head(app):
    from app.extensions import db

    with app.app_context():
        version = db.session.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    heads = [p.stem.split("_")[0] for p in (ROOT / "migrations" / "versions").glob("*.py")]
    assert version in heads


def test_the_db_command_migrates_while_web_and_worker_never_load_alembic(tmp_path, service_env):
    env = {
        **service_env,
        "PATH": str(Path(sys.executable).parent),
        "INSTANCE_PATH": str(tmp_path),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}",
    }
    env.pop("REDIS_URL", None)
    flask = [sys.executable, "-m", "flask", "--app", "wsgi", "db"]

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*flask, *args], cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True)

    def at_head() -> bool:
        current = run("current")
        assert current.returncode == 0, current.stderr
        return "(head)" in current.stdout

    assert run("upgrade").returncode == 0 and at_head()
    # Everything after `db` reaches Flask-Migrate as typed: `--` before a relative revision, FLASK_DB_* too.
    assert run("downgrade", "--", "-1").returncode == 0 and not at_head()
    assert run("upgrade", "-d", str(ROOT / "migrations")).returncode == 0 and at_head()
    assert run("heads", FLASK_DB_DIRECTORY=str(tmp_path / "nowhere")).returncode == 1
    # A failing migration fails the release phase.
    assert run("upgrade", "no-such-revision").returncode == 1
    unknown = run("no-such-command")
    assert unknown.returncode == 2 and "No such command" in unknown.stderr

    # Alembic, Mako and Pygments are ~10 MiB that a serving process does not need.
    probe = "import sys, wsgi, celery_app; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert "'flask'" in loaded.stdout
    for package in ("alembic", "flask_migrate", "mako", "pygments"):
        assert f"'{package}'" not in loaded.stdout


# --- OpenAPI ------------------------------------------------------------------------------------------------


def test_openapi_documents_every_endpoint_status_and_the_bearer_scheme(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
    }
    assert spec["security"] == [{"bearerAuth": []}]
    paths = spec["paths"]
    expected = {
        ("/api/connectors", "get"): {"200", "401", "429", "503"},
        ("/api/connectors", "post"): {"201", "400", "401", "409", "413", "429", "503"},
        ("/api/connectors/{connector_id}", "put"): {"200", "400", "401", "404", "409", "503"},
        ("/api/connectors/{connector_id}", "delete"): {"204", "401", "404", "409", "503"},
        ("/api/connectors/{connector_id}/test", "post"): {"200", "400", "401", "404", "409", "429", "502", "503"},
        ("/api/connectors/{connector_id}/deliveries", "get"): {"200", "400", "401", "404", "503"},
        ("/api/internal/hosts/{host_id}/will", "put"): {"200", "400", "401", "403", "503"},
        ("/api/health", "get"): {"200"},
        ("/api/health/ready", "get"): {"200", "503"},
    }
    for (path, method), statuses in expected.items():
        operation = paths[path][method]
        assert statuses <= set(operation["responses"]), (path, method, set(operation["responses"]))
        assert operation["summary"], (path, method)
    assert paths["/api/health"]["get"]["security"] == []
    create_body = paths["/api/connectors"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert create_body["$ref"].endswith("ConnectorCreate")
    schemas = spec["components"]["schemas"]
    # Each type's config, from the schemas the API validates with, chosen by the `type` discriminator.
    create = schemas["ConnectorCreate"]
    assert create["discriminator"]["propertyName"] == "type"
    assert set(create["discriminator"]["mapping"]) == {"email", "sms", "whatsapp", "telegram"}
    email = schemas["EmailConnectorCreate"]["properties"]
    assert email["type"]["enum"] == ["email"] and email["config"]["allOf"][0]["$ref"].endswith("/EmailConfig")
    assert schemas["EmailConfig"]["properties"]["password"]["writeOnly"] is True
    assert (email["name"]["minLength"], email["name"]["maxLength"]) == (1, 100)
    # One error schema for every error status, flask-smorest's own 400 and default included.
    assert "Error" not in schemas
    for name in ("BAD_REQUEST", "DEFAULT_ERROR"):
        assert spec["components"]["responses"][name]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorEnvelope"
        )
    codes = set(schemas["ErrorEnvelope"]["properties"]["error_code"]["enum"])
    assert {"auth_failed", "timeout", "database_unavailable", "busy", "unknown"} <= codes
    connector = spec["components"]["schemas"]["Connector"]["properties"]
    assert set(connector) == {"id", "type", "name", "is_verified", "priority", "created_at"}


def test_every_operation_is_described_and_says_which_error_codes_each_status_carries(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            assert operation["summary"] and len(operation.get("description", "")) > 40, (path, method)
            answer = operation["responses"].get("503", {})
            if path.startswith("/api/") and "/health" not in path:
                assert "`database_unavailable`" in answer["description"], (path, method)

    def described(path: str, method: str, status: str) -> str:
        return paths[path][method]["responses"][status]["description"]

    assert "`last_connector`" in described("/api/connectors/{connector_id}", "delete", "409")
    unprocessable = described("/api/internal/hosts/{host_id}/messages", "post", "422")
    assert "`no_route`" in unprocessable and "`idempotency_key_reused`" in unprocessable
    for action in ("test", "verify"):
        path = f"/api/connectors/{{connector_id}}/{action}"
        assert "`in_progress`" in described(path, "post", "409")
        for code in ("auth_failed", "destination_rejected", "provider_error", "timeout", "worker_error"):
            assert f"`{code}`" in described(path, "post", "502"), (action, code)
        assert "`busy`" in described(path, "post", "503") and "`broker_unavailable`" in described(path, "post", "503")


def test_swagger_ui_is_served_from_this_service_alone(client):
    response = client.get("/docs")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "swagger" in page.lower() and "http://" not in page and "https://" not in page
    assets = re.findall(r'(?:src|href)="(/docs/swagger-ui/[^"]+)"', page)
    assert len(assets) >= 3
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert json.loads(client.get("/openapi.json").get_data())["info"]["title"] == "BAPBA Connectors API"
