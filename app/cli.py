"""`flask --app wsgi token HOST_ID` and `flask --app wsgi reseal-configs`."""

from __future__ import annotations

import uuid
from datetime import timedelta

import click
from flask import Flask
from flask_jwt_extended import create_access_token

from app.connectors.service import reseal_all


def register_commands(app: Flask) -> None:
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

    @app.cli.command("reseal-configs")
    def reseal_configs() -> None:
        """Re-seal every connector config under the current MASTER_KEY (after a rotation)."""
        count, unopenable = reseal_all()
        click.echo(f"re-sealed {count} connector(s)")
        if unopenable:
            click.echo(
                f"{len(unopenable)} connector(s) open with no known key: {', '.join(map(str, unopenable))}", err=True
            )
            raise SystemExit(1)
