"""Email through the Host's SMTP account: STARTTLS (default), implicit TLS or none, verified certificates."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, validate

from app.channels.base import ChannelType, DeliveryError, Exchange, OutgoingMessage, Provider, tls_context
from app.channels.netguard import connect_checked, literal_host_blocked
from app.fields import PRINTABLE_ASCII, EmailAddress, StrictInteger, credential, email_address
from app.outcomes import (
    AUTH_FAILED,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    PROVIDER_UNREACHABLE,
    SENDER_REJECTED,
)

# What is read of a server's replies in one session: far more than any real dialogue needs.
MAX_REPLY_BYTES = 256 * 1024


def _hostname(value: str) -> None:
    if any(char.isspace() for char in value) or "/" in value or "@" in value:
        raise ValidationError("Must be a host name or IP address, without scheme or path.")


def refused_fields(config: dict[str, Any], allow_private: bool) -> dict[str, list[str]]:
    """The config's fields this deployment refuses (ALLOW_PRIVATE_DESTINATIONS): a literal loopback, private,
    link-local or reserved SMTP host. A name that resolves to one is refused by the worker at the connection."""
    if not allow_private and literal_host_blocked(config["smtp_host"]):
        return {"smtp_host": ["Loopback, private, link-local and reserved addresses are not allowed."]}
    return {}


class EmailConfig(Schema):
    class Meta:
        unknown = RAISE

    smtp_host = fields.String(
        required=True, validate=[validate.Length(1, 253), _hostname], metadata={"format": "hostname"}
    )
    smtp_port = StrictInteger(required=True, validate=validate.Range(1, 65535))
    username = fields.String(required=True, validate=[validate.Length(1, 320), PRINTABLE_ASCII])
    password = credential(1024)
    from_address = EmailAddress(required=True)
    security = fields.String(validate=validate.OneOf(["starttls", "ssl", "none"]))

    @post_load
    def default_security(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        data.setdefault("security", "ssl" if data["smtp_port"] == 465 else "starttls")
        return data


def mask(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}"


class _PinnedSocket:
    """Connects smtplib to an address checked by the network guard, keeping the name for TLS."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect(self, host: str, port: int, timeout: float) -> socket.socket:
        return connect_checked(host, port, timeout, self.allow_private)


class _ReplyTooLong(smtplib.SMTPException):
    """The server's replies went past MAX_REPLY_BYTES."""


class _CountedReplies:
    """The server's side of the dialogue as smtplib reads it (`readline`), counted: smtplib bounds each line but
    not a reply's continuation lines, and a Host's server could send them until the deadline, into memory."""

    def __init__(self, stream: Any, client: Any) -> None:
        self.stream, self.client = stream, client

    def readline(self, size: int = -1) -> bytes:
        if self.client.reply_bytes > MAX_REPLY_BYTES:
            raise _ReplyTooLong()  # again: the session's QUIT must not read on either
        line = self.stream.readline(size)
        self.client.reply_bytes += len(line)
        if self.client.reply_bytes > MAX_REPLY_BYTES:
            raise _ReplyTooLong()
        return line

    def close(self) -> None:
        self.stream.close()


class _BoundedReplies:
    """For both SMTP classes: every reply read through `_CountedReplies`, one budget for the whole session (it
    carries over STARTTLS, after which smtplib makes its reader anew)."""

    reply_bytes = 0
    file: Any
    sock: Any

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _CountedReplies(self.sock.makefile("rb"), self)
        return super().getreply()  # type: ignore[misc]


class _SMTP(_BoundedReplies, smtplib.SMTP):
    def __init__(self, pin: _PinnedSocket, **kwargs: Any) -> None:
        self._pin = pin
        super().__init__(**kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._pin.connect(host, port, timeout)


class _SMTPSSL(_BoundedReplies, smtplib.SMTP_SSL):
    def __init__(self, pin: _PinnedSocket, **kwargs: Any) -> None:
        self._pin = pin
        super().__init__(**kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = self._pin.connect(host, port, timeout)
        return self.context.wrap_socket(sock, server_hostname=self._host)


def _reply_text(code: int, reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    return f"{code} {text}".strip()  # scrubbed of secrets, then shortened, before anyone sees it


def _cut(client: smtplib.SMTP) -> None:
    sock = client.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class EmailProvider(Provider):
    secret_fields = ("password",)

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> str | None:
        exchange = Exchange()

        sent_id: list[str | None] = [None]

        def deliver(client: smtplib.SMTP, _greeting: str) -> None:
            email = self._build(config["from_address"], destination, message)
            sent_id[0] = str(email["Message-ID"])[:128]
            # From here the server may take the message; a failure without a refusal may come after it did.
            exchange.request_out = True
            try:
                client.send_message(email)
            except smtplib.SMTPNotSupportedError:
                raise DeliveryError(
                    DESTINATION_REJECTED, "SMTP server cannot take this address (no SMTPUTF8 support)"
                ) from None
            except smtplib.SMTPResponseException as exc:
                # An error reply says the server did not take the message. smtplib raises this type for a reply it
                # could not read too (a code that is not a number, -1; a line too long, its own 500).
                if 400 <= exc.smtp_code < 600 and exc.smtp_error not in (b"Line too long.", "Line too long."):
                    exchange.refused = True
                raise

        self._session(config, deliver, exchange)
        return sent_id[0]

    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        details: dict[str, str] = {}

        def probe(client: smtplib.SMTP, greeting: str) -> None:
            # The server accepts this sender for these credentials; no RCPT, no DATA: nothing is delivered.
            code, reply = client.mail(config["from_address"])
            if code != 250:
                client.rset()
                raise DeliveryError(
                    SENDER_REJECTED, "SMTP server refused the sender address", reply=_reply_text(code, reply)
                )
            client.rset()
            if greeting:
                details["server"] = greeting

        self._session(config, probe)
        return details

    def _session(
        self, config: dict[str, Any], work: Callable[[smtplib.SMTP, str], None], exchange: Exchange | None = None
    ) -> None:
        """Connect, secure, log in, then `work`; every failure becomes a DeliveryError, which says whether the
        message may have been taken (`exchange`, which `work` keeps)."""
        host, port = config["smtp_host"], int(config["smtp_port"])
        timeout = self.settings.timeout
        maybe_sent = (lambda: exchange.maybe_sent) if exchange is not None else (lambda: False)
        with self._client(config) as (client, watchdog):
            try:
                code, reply = client.connect(host, port)
                if code != 220:
                    raise smtplib.SMTPConnectError(code, reply)
                greeting = (reply.decode("utf-8", "replace").split() or [""])[0][:253]
                with client:
                    if config.get("security", "starttls") == "starttls":
                        client.ehlo()
                        if not client.has_extn("starttls"):
                            raise DeliveryError(
                                PROVIDER_UNREACHABLE,
                                "SMTP server does not offer STARTTLS; set security to ssl or none",
                            )
                        client.starttls(context=tls_context())
                        client.ehlo()
                    client.login(config["username"], config["password"])
                    work(client, greeting)
            except DeliveryError:
                raise
            except smtplib.SMTPAuthenticationError as exc:
                raise DeliveryError(
                    AUTH_FAILED, "SMTP server rejected the login", reply=_reply_text(exc.smtp_code, exc.smtp_error)
                ) from None
            except smtplib.SMTPNotSupportedError:
                raise DeliveryError(AUTH_FAILED, "SMTP server does not offer AUTH on this connection") from None
            except smtplib.SMTPRecipientsRefused as exc:
                code, reply = next(iter(exc.recipients.values()))
                raise DeliveryError(
                    DESTINATION_REJECTED, "SMTP server rejected the recipient", reply=_reply_text(code, reply)
                ) from None
            except smtplib.SMTPSenderRefused as exc:
                raise DeliveryError(
                    SENDER_REJECTED,
                    "SMTP server refused the sender address",
                    reply=_reply_text(exc.smtp_code, exc.smtp_error),
                ) from None
            except smtplib.SMTPConnectError:
                raise DeliveryError(PROVIDER_UNREACHABLE, f"SMTP server {host}:{port} refused the session") from None
            except smtplib.SMTPResponseException as exc:
                raise DeliveryError(
                    PROVIDER_ERROR,
                    "SMTP server refused the message",
                    reply=_reply_text(exc.smtp_code, exc.smtp_error),
                    maybe_sent=maybe_sent(),  # unless its reply says so (an error code), it may have taken it
                ) from None
            except ssl.SSLError as exc:
                raise DeliveryError(
                    PROVIDER_UNREACHABLE, f"TLS with {host}:{port} failed: {exc.reason}", maybe_sent=maybe_sent()
                ) from None
            except (OSError, smtplib.SMTPException) as exc:
                if client.reply_bytes > MAX_REPLY_BYTES:  # whatever closing the session raised after it
                    raise DeliveryError(
                        PROVIDER_ERROR,
                        f"SMTP server {host}:{port} replied more than {MAX_REPLY_BYTES // 1024} KiB",
                        maybe_sent=maybe_sent(),
                    ) from None
                if not watchdog.is_alive():
                    raise DeliveryError(
                        PROVIDER_UNREACHABLE,
                        f"SMTP server {host}:{port} did not finish within {timeout:g} s",
                        maybe_sent=maybe_sent(),
                    ) from None
                if client.sock is None:
                    raise DeliveryError(PROVIDER_UNREACHABLE, f"cannot connect to SMTP server {host}:{port}") from None
                if isinstance(exc, TimeoutError):
                    raise DeliveryError(
                        PROVIDER_UNREACHABLE, f"SMTP server {host}:{port} stopped answering", maybe_sent=maybe_sent()
                    ) from None
                raise DeliveryError(
                    PROVIDER_UNREACHABLE,
                    f"SMTP conversation with {host}:{port} failed ({type(exc).__name__})",
                    maybe_sent=maybe_sent(),
                ) from None

    @contextmanager
    def _client(self, config: dict[str, Any]) -> Iterator[tuple[smtplib.SMTP, threading.Timer]]:
        timeout = self.settings.timeout
        pin = _PinnedSocket(self.settings.allow_private)
        if config.get("security", "starttls") == "ssl":
            client: smtplib.SMTP = _SMTPSSL(pin, context=tls_context(), timeout=timeout)
        else:
            client = _SMTP(pin, timeout=timeout)
        client._host = config["smtp_host"]  # the name TLS checks the certificate against (set only in __init__)
        # The timeout bounds each socket operation; a server trickling endless reply lines would still hold
        # the thread, so the whole dialogue, greeting included, also ends at the deadline.
        watchdog = threading.Timer(timeout, _cut, args=(client,))
        watchdog.daemon = True
        watchdog.start()
        try:
            yield client, watchdog
        finally:
            watchdog.cancel()
            client.close()

    @staticmethod
    def _build(sender: str, recipient: str, message: OutgoingMessage) -> EmailMessage:
        email = EmailMessage()
        email["From"] = sender
        email["To"] = recipient
        email["Subject"] = message.subject
        email["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
        email.set_content(message.text)
        if message.html:
            email.add_alternative(message.html, subtype="html")
        return email


CHANNEL = ChannelType(
    name="email",
    config_schema=EmailConfig,
    provider=EmailProvider,
    recipient_field="email",
    normalize=email_address,
    mask=mask,
    refused_fields=refused_fields,
)
