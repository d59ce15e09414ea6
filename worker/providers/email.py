"""SMTP with STARTTLS (default), implicit TLS or none, verified against the system trust store."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import threading
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from worker.providers.base import (
    AUTH_FAILED,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    PROVIDER_UNREACHABLE,
    DeliveryError,
    OutgoingMessage,
    Provider,
    connect_checked,
    tls_context,
)


class _PinnedSocket:
    """Connects smtplib to an address checked by the network guard, keeping the name for TLS."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        return connect_checked(host, port, timeout, self.allow_private)


class _SMTP(smtplib.SMTP):
    def __init__(self, pin: _PinnedSocket, **kwargs: Any) -> None:
        self._pin = pin
        super().__init__(**kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._pin.connect(host, port, timeout)


class _SMTPSSL(smtplib.SMTP_SSL):
    def __init__(self, pin: _PinnedSocket, **kwargs: Any) -> None:
        self._pin = pin
        super().__init__(**kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = self._pin.connect(host, port, timeout)
        return self.context.wrap_socket(sock, server_hostname=self._host)


def _reply_text(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return f"{code} {text}".strip()  # the task scrubs secrets from it, then shortens it


def _cut(client: smtplib.SMTP) -> None:
    sock = client.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class EmailProvider(Provider):
    type = "email"
    secret_fields = ("password",)

    def secrets(self, config: dict[str, Any]) -> list[str]:
        # A server may echo the AUTH exchange, which carries the password base64-encoded.
        password, username = str(config.get("password") or ""), str(config.get("username") or "")
        plain = f"\0{username}\0{password}".encode()
        return [password, base64.b64encode(password.encode()).decode(), base64.b64encode(plain).decode()]

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
        host, port, security = config["smtp_host"], int(config["smtp_port"]), config.get("security", "starttls")
        timeout = self.settings.timeout
        pin = _PinnedSocket(self.settings.allow_private)
        context = tls_context()
        if security == "ssl":
            client: smtplib.SMTP = _SMTPSSL(pin, context=context, timeout=timeout)
        else:
            client = _SMTP(pin, timeout=timeout)
        client._host = host  # the name TLS checks the certificate against (smtplib sets it only in __init__)
        # The timeout bounds each socket operation; a server trickling endless reply lines would still hold
        # the thread, so the whole dialogue, greeting included, also ends at the deadline.
        watchdog = threading.Timer(timeout, _cut, args=(client,))
        watchdog.daemon = True
        watchdog.start()
        try:
            self._converse(client, config, destination, message, context)
        except DeliveryError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                AUTH_FAILED, f"SMTP server rejected the login ({_reply_text(exc.smtp_code, exc.smtp_error)})"
            ) from None
        except smtplib.SMTPNotSupportedError:
            raise DeliveryError(AUTH_FAILED, "SMTP server does not offer AUTH on this connection") from None
        except smtplib.SMTPRecipientsRefused as exc:
            code, reply = next(iter(exc.recipients.values()))
            raise DeliveryError(
                DESTINATION_REJECTED, f"SMTP server rejected the recipient ({_reply_text(code, reply)})"
            ) from None
        except smtplib.SMTPSenderRefused as exc:
            raise DeliveryError(
                DESTINATION_REJECTED,
                f"SMTP server rejected the sender address ({_reply_text(exc.smtp_code, exc.smtp_error)})",
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(
                PROVIDER_ERROR, f"SMTP server refused the message ({_reply_text(exc.smtp_code, exc.smtp_error)})"
            ) from None
        except ssl.SSLError as exc:
            raise DeliveryError(PROVIDER_UNREACHABLE, f"TLS with {host}:{port} failed: {exc.reason}") from None
        except (OSError, smtplib.SMTPException) as exc:
            if not watchdog.is_alive():
                raise DeliveryError(
                    PROVIDER_UNREACHABLE, f"SMTP server {host}:{port} did not finish within {timeout:g} s"
                ) from None
            if client.sock is None or isinstance(exc, smtplib.SMTPConnectError):
                raise DeliveryError(PROVIDER_UNREACHABLE, f"cannot connect to SMTP server {host}:{port}") from None
            if isinstance(exc, TimeoutError):
                raise DeliveryError(PROVIDER_UNREACHABLE, f"SMTP server {host}:{port} stopped answering") from None
            raise DeliveryError(
                PROVIDER_UNREACHABLE, f"SMTP conversation with {host}:{port} failed ({type(exc).__name__})"
            ) from None
        finally:
            watchdog.cancel()

    def _converse(
        self,
        client: smtplib.SMTP,
        config: dict[str, Any],
        destination: str,
        message: OutgoingMessage,
        context: ssl.SSLContext,
    ) -> None:
        client.connect(config["smtp_host"], int(config["smtp_port"]))
        with client:
            if config.get("security", "starttls") == "starttls":
                client.ehlo()
                if not client.has_extn("starttls"):
                    raise DeliveryError(
                        PROVIDER_UNREACHABLE, "SMTP server does not offer STARTTLS; set security to ssl or none"
                    )
                client.starttls(context=context)
                client.ehlo()
            client.login(config["username"], config["password"])
            try:
                client.send_message(self._build(config["from_address"], destination, message))
            except smtplib.SMTPNotSupportedError:
                raise DeliveryError(
                    DESTINATION_REJECTED, "SMTP server cannot take this address (no SMTPUTF8 support)"
                ) from None

    @staticmethod
    def _build(sender: str, recipient: str, message: OutgoingMessage) -> EmailMessage:
        email = EmailMessage()
        email["From"] = sender
        email["To"] = recipient
        email["Subject"] = message.subject
        email["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
        email.set_content(message.text)
        email.add_alternative(message.html, subtype="html")
        return email
