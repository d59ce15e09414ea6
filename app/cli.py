"""The `flask --app wsgi ...` commands: tokens and keys, the development sinks, re-sealing, migrations, and the
operators' read-only views (`app/operators.py`)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import click
from flask import Flask
from flask.cli import ScriptInfo
from flask_jwt_extended import create_access_token

from app.extensions import init_migrations
from app.operators import register_operator_commands
from app.rotation import reseal_all


class _MigrationsCommand(click.Command):
    """`flask db ...`: Flask-Migrate's `db` group, imported only when the command runs.

    Its arguments go to that group untouched (`--` included), with the same `FLASK_DB_*` variables and the
    same exit status, so the release phase still fails on a failing migration.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.args = list(args)
        return []

    def invoke(self, ctx: click.Context) -> None:
        init_migrations(ctx.ensure_object(ScriptInfo).load_app())
        from flask_migrate.cli import db

        status = db.main(
            args=ctx.args,
            prog_name=ctx.command_path,
            obj=ctx.obj,
            auto_envvar_prefix=ctx.auto_envvar_prefix,
            standalone_mode=False,
        )
        if isinstance(status, int) and status:
            ctx.exit(status)


def register_commands(app: Flask) -> None:
    app.cli.add_command(_MigrationsCommand("db", help="Database migrations (Flask-Migrate's `db` commands)."))
    register_operator_commands(app)  # connectors, messages, message, events: read-only

    @app.cli.command("token")
    @click.argument("subject")
    @click.option("--hours", default=24.0, show_default=True, help="Lifetime of the token.")
    @click.option("--service", is_flag=True, help="Mint a will-service token (role=service) instead.")
    def token(subject: str, hours: float, service: bool) -> None:
        """Print a bearer token for a Host uuid (or, with --service, for an internal service)."""
        if not service:
            try:
                subject = str(uuid.UUID(subject))
            except ValueError:
                raise click.BadParameter("must be a uuid", param_hint="SUBJECT") from None
        claims = {"role": "service"} if service else None
        click.echo(create_access_token(subject, additional_claims=claims, expires_delta=timedelta(hours=hours)))

    @app.cli.command("mail-sink")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=8025, show_default=True, type=click.IntRange(1, 65535))
    def mail_sink(host: str, port: int) -> None:
        """A development SMTP server: accepts any login (no TLS) and prints every message it receives."""
        from app.devmail import run_mail_sink

        run_mail_sink(host, port)

    @app.cli.command("provider-sink")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", default=8026, show_default=True, type=click.IntRange(1, 65535))
    def provider_sink(host: str, port: int) -> None:
        """A development HTTP server playing Twilio, WhatsApp Cloud and Telegram: prints every message it receives."""
        from app.devsink import run_provider_sink

        run_provider_sink(host, port)

    @app.cli.command("keys")
    def keys() -> None:
        """Print a fresh JWT_SECRET_KEY and MASTER_KEY, as .env lines."""
        import secrets

        click.echo(f"JWT_SECRET_KEY={secrets.token_hex(32)}")
        click.echo(f"MASTER_KEY={secrets.token_hex(32)}")

    @app.cli.command("reseal-configs")
    def reseal_configs() -> None:
        """Re-seal connector configs, message bodies and digest keys under the current MASTER_KEY (after a rotation).

        Once it reports with exit status 0, the keys of OLD_MASTER_KEYS can go. Exit status 1 when some rows open
        with no known key: they are listed (a digest key by its Host's id) and left as they are.
        """
        report = reseal_all()
        kinds = (
            ("connector(s)", report.connectors),
            ("message body(ies)", report.message_bodies),
            ("Host digest key(s)", report.digest_keys),
            ("test destination(s)", report.test_destinations),
        )
        for label, kind in kinds:
            click.echo(f"re-sealed {kind.count} {label}")
        stuck = [(label, kind.unopenable) for label, kind in kinds if kind.unopenable]
        for label, ids in stuck:
            click.echo(f"{len(ids)} {label} open with no known key: {', '.join(map(str, ids))}", err=True)
        if stuck:
            raise SystemExit(1)
