"""A development mail sink: an SMTP server that takes any login and prints what arrives.

For a laptop only: test deliveries need an SMTP server that offers AUTH, and `python -m aiosmtpd` offers none.
"""

from __future__ import annotations

import email
import email.policy
import logging
import threading
import warnings
from typing import Any

import click
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class _Printer:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 (aiosmtpd's name)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain", "html"))
        click.echo(f"--- mail from {envelope.mail_from} to {', '.join(envelope.rcpt_tos)}")
        click.echo(f"Subject: {message['Subject']}")
        click.echo(body.get_content().strip() if body is not None else "(no text part)")
        return "250 Message accepted"


def _any_login(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    return AuthResult(success=True)


def run_mail_sink(host: str, port: int) -> None:
    # Its own log is a line per SMTP command, and it warns that AUTH without TLS is unsafe: true, and the
    # reason this is for a laptop only.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="aiosmtpd")
    controller = Controller(
        _Printer(), hostname=host, port=port, authenticator=_any_login, auth_required=True, auth_require_tls=False
    )
    controller.start()
    click.echo(f"mail sink on {host}:{port}: any username and password; security none; Ctrl-C to stop")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()
