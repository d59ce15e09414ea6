"""Real protocol peers on loopback: an SMTP server and HTTP servers speaking Twilio, WhatsApp Cloud and Telegram.

Each records what it receives and can be told to answer: ok, auth (bad credentials), reject (the recipient),
error (a 5xx), or slow (longer than the provider timeout).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SLOW_SECONDS = 4.0
DRIP_SECONDS = 0.25  # between two bytes of a dripped answer
HUGE_BYTES = 64 * 1024 * 1024
_request = threading.local()  # the peer generation an HTTP request began in


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Peer:
    mode: str = "ok"
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    credentials: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds an HTTP peer waits before answering, in any mode

    def record(self, item: dict[str, Any], generation: int | None = None) -> None:
        """Keep what arrived; a request that began before the last reset belongs to an earlier test."""
        with self.lock:
            started = getattr(_request, "generation", None) if generation is None else generation
            if started is None or started == self.generation:
                self.received.append(item)

    def __post_init__(self) -> None:
        self.original_credentials = dict(self.credentials)
        self.generation = 0

    def reset(self) -> None:
        with self.lock:
            self.generation += 1
            self.received.clear()
            self.mode = "ok"
            self.delay = 0.0
            self.credentials = dict(self.original_credentials)
            for name in ("owned_numbers", "listed_numbers"):  # back to the class's defaults
                self.__dict__.pop(name, None)
            if hasattr(self, "rcpt_count"):
                self.rcpt_count = 0
            if hasattr(self, "gave_up_after"):
                self.gave_up_after, self.bytes_written = [], 0
            if hasattr(self, "refused"):
                self.refused = 0

    def wait_for(self, count: int, seconds: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(self.received) < count:
            time.sleep(0.01)
        return list(self.received)


# --- SMTP -------------------------------------------------------------------------------------------------


class _SmtpHandler:
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # noqa: N802, ANN001, ANN201
        if self.peer.mode == "reject_sender":
            return "550 5.7.1 Sender address not allowed for this account"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802, ANN001, ANN201
        self.peer.rcpt_count += 1
        if self.peer.mode == "reject":
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802, ANN001, ANN201
        generation = self.peer.generation
        if self.peer.mode == "slow":
            import asyncio

            await asyncio.sleep(SLOW_SECONDS)
        if self.peer.mode == "error":
            return "451 4.3.0 Local error in processing"
        if self.peer.mode == "endless":  # a reply of continuation lines far past any real one
            return "250-" + "\r\n250-".join(["x" * 900] * 400) + "\r\n250 accepted"
        self.peer.record(
            {
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "data": envelope.content.decode("utf-8", "replace"),
                "tls": session.ssl is not None,
                "login": session.login_data.decode() if isinstance(session.login_data, bytes) else session.login_data,
            },
            generation,
        )
        if self.peer.mode == "garbled":  # taken, but the final reply cannot be read
            return "2x0 Message accepted"
        return "250 Message accepted"


class SmtpPeer(Peer):
    def __init__(self, username: str, password: str, tls_context: ssl.SSLContext | None = None) -> None:
        super().__init__(credentials={"username": username, "password": password})
        self.rcpt_count = 0
        self.port = free_port()
        peer = self

        def authenticator(server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN202
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == peer.credentials["username"]
                and auth_data.password.decode() == peer.credentials["password"]
                and peer.mode != "auth"
            )
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        self.controller = Controller(
            _SmtpHandler(self),
            hostname="127.0.0.1",
            port=self.port,
            server_hostname="mx.peer.example",
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=tls_context is not None,
            require_starttls=tls_context is not None,
            tls_context=tls_context,
        )

    def start(self) -> SmtpPeer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, to be trusted through SSL_CERT_FILE."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "peer-cert.pem", directory / "peer-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# --- HTTP peers -------------------------------------------------------------------------------------------


class HttpPeer(Peer):
    """Base for the HTTP providers: subclasses implement `answer(method, path, headers, body)`."""

    def __init__(self, **credentials: str) -> None:
        super().__init__(credentials=credentials)
        self.connections = 0
        self.bytes_written = 0  # of huge answers
        self.gave_up_after: list[float] = []  # seconds into an answer at which the client hung up
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with peer.lock:
                    peer.connections += 1  # TCP connections accepted: a kept client opens one for many requests

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                _request.generation = peer.generation
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if peer.mode == "slow":
                    time.sleep(SLOW_SECONDS)
                time.sleep(peer.delay)
                status, payload = peer.answer(self.command, self.path, self.headers, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                if peer.mode == "garbled":  # taken, but the answer is not what the API sends
                    data = b"<html><body>Service temporarily overloaded</body></html>"
                # "huge": an answer far longer than any API's; "drip": the real answer, a byte at a time.
                size = HUGE_BYTES if peer.mode == "huge" else len(data)
                started = time.monotonic()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    if peer.mode == "huge":
                        chunk = b" " * 65536
                        for _ in range(size // len(chunk)):
                            self.wfile.write(chunk)
                            peer.bytes_written += len(chunk)
                    elif peer.mode == "drip":
                        for index in range(len(data)):
                            self.wfile.write(data[index : index + 1])
                            self.wfile.flush()
                            time.sleep(DRIP_SECONDS)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    # The client gave up first (the point of the slow, drip and huge modes): when.
                    peer.gave_up_after.append(time.monotonic() - started)

            do_GET = do_POST = _handle  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> HttpPeer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        """(status, JSON-able payload or raw bytes)."""
        raise NotImplementedError


class TwilioPeer(HttpPeer):
    """POST /2010-04-01/Accounts/{AccountSid}/Messages.json, HTTP basic auth with the API key; and for checks
    GET /2010-04-01/Accounts/{AccountSid}.json and .../IncomingPhoneNumbers.json?PhoneNumber=..."""

    PATH = re.compile(r"^/2010-04-01/Accounts/(AC[0-9a-fA-F]{32})/Messages\.json$")
    ACCOUNT = re.compile(r"^/2010-04-01/Accounts/(AC[0-9a-fA-F]{32})(/IncomingPhoneNumbers)?\.json(\?.*)?$")
    owned_numbers = ("+14155550100",)

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        if method == "GET" and self.ACCOUNT.match(path):
            return self._account(path, headers)
        match = self.PATH.match(path)
        if method != "POST" or not match:
            return 404, {"code": 20404, "message": "The requested resource was not found", "status": 404}
        return self._messages(match, headers, body)

    def _authorized(self, headers: Any, account: str) -> bool:
        auth = headers.get("Authorization", "")
        user, _, secret = (
            base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":") if auth else ("", "", "")
        )
        return (
            user == self.credentials["api_key_sid"]
            and secret == self.credentials["api_key_secret"]
            and account == self.credentials["account_sid"]
            and self.mode != "auth"
        )

    def _account(self, path: str, headers: Any) -> tuple[int, Any]:
        match = self.ACCOUNT.match(path)
        assert match is not None
        account = match.group(1)
        if not self._authorized(headers, account):
            return 401, {"code": 20003, "message": "Authenticate", "status": 401}
        self.record({"check": "numbers" if match.group(2) else "account", "account": account})
        if not match.group(2):
            return 200, {"sid": account, "friendly_name": "BAPBA test account", "status": "active"}
        wanted = parse_qs((match.group(3) or "?")[1:]).get("PhoneNumber", [None])[0]
        numbers = [n for n in self.owned_numbers if wanted in (None, n)]
        return 200, {
            "incoming_phone_numbers": [
                {"sid": "PN" + "0" * 32, "account_sid": account, "phone_number": n, "friendly_name": n} for n in numbers
            ],
            "page": 0, "page_size": 50, "first_page_uri": path, "next_page_uri": None, "previous_page_uri": None,
            "uri": path, "start": 0, "end": len(numbers),
        }  # fmt: skip

    def _messages(self, match: re.Match[str], headers: Any, body: bytes) -> tuple[int, Any]:
        auth = headers.get("Authorization", "")
        if not self._authorized(headers, match.group(1)):
            return 401, {
                "code": 20003,
                "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401,
            }
        form = {key: values[0] for key, values in parse_qs(body.decode()).items()}
        if self.mode == "echo":  # a provider that quotes what it was sent, credentials included
            return 400, {"code": 21211, "message": f"Bad request with Authorization: {auth}", "status": 400}
        if self.mode == "reject":
            return 400, {
                "code": 21211,
                "message": f"The 'To' number {form.get('To')} is not a valid phone number.",
                "more_info": "https://www.twilio.com/docs/errors/21211",
                "status": 400,
            }
        if self.mode == "error":
            return 500, {"code": 20500, "message": "Internal Server Error", "status": 500}
        if self.mode == "quote":  # a content filter quoting what it refused
            return 400, {"code": 30007, "message": f"Message filtered: {form.get('Body')}", "status": 400}
        sid = "SM" + uuid.uuid4().hex  # each message its own, as Twilio's: receipts name it
        self.record(
            {
                "to": form.get("To"), "from": form.get("From"), "body": form.get("Body"), "account": match.group(1),
                "sid": sid, "status_callback": form.get("StatusCallback"),
            }
        )  # fmt: skip
        return 201, {
            "sid": sid,
            "account_sid": match.group(1),
            "to": form.get("To"),
            "from": form.get("From"),
            "body": form.get("Body"),
            "status": "queued",
            "num_segments": "1",
            "direction": "outbound-api",
            "api_version": "2010-04-01",
            "date_created": "Fri, 27 Nov 2026 10:00:00 +0000",
            "uri": f"/2010-04-01/Accounts/{match.group(1)}/Messages/{sid}.json",
        }


class WhatsAppPeer(HttpPeer):
    """POST /{version}/{phone_number_id}/messages with a bearer access token; and for checks GET
    /{version}/{phone_number_id}?fields=... and /{version}/{business_account_id}/phone_numbers."""

    PATH = re.compile(r"^/(v[0-9]+\.[0-9]+)/([0-9]+)/messages$")
    GRAPH_GET = re.compile(r"^/(v[0-9]+\.[0-9]+)/([0-9]+)(/phone_numbers)?(\?.*)?$")
    listed_numbers: tuple[str, ...] | None = None  # phone number ids the business account lists (default: ours)

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        if method == "GET" and self.GRAPH_GET.match(path):
            return self._graph_get(path, headers)
        match = self.PATH.match(path)
        if method != "POST" or not match:
            return 404, {"error": {"message": "Unknown path components", "type": "OAuthException", "code": 2500}}
        token = headers.get("Authorization", "").removeprefix("Bearer ")
        if token != self.credentials["access_token"] or self.mode == "auth":
            return 401, {
                "error": {
                    "message": "Invalid OAuth access token - Cannot parse access token",
                    "type": "OAuthException",
                    "code": 190,
                    "fbtrace_id": "Atrace",
                }
            }
        if match.group(2) != self.credentials["phone_number_id"]:
            return 400, {"error": {"message": "Unsupported post request", "type": "GraphMethodException", "code": 100}}
        payload = json.loads(body or b"{}")
        if self.mode == "echo":  # quotes the token, base64-encoded the way some gateways log it
            quoted = base64.b64encode(f"Bearer {token}".encode()).decode()
            return 500, {"error": {"message": f"upstream refused credentials {quoted}", "code": 1}}
        if self.mode == "reject":
            return 400, {
                "error": {
                    "message": "(#131030) Recipient phone number not in allowed list",
                    "type": "OAuthException",
                    "code": 131030,
                    "fbtrace_id": "Atrace",
                }
            }
        if self.mode == "error":
            return 500, {"error": {"message": "An unknown error occurred", "type": "OAuthException", "code": 1}}
        wamid = f"wamid.{uuid.uuid4().hex}"  # each message its own: Meta's receipts name it
        self.record({"version": match.group(1), "phone_number_id": match.group(2), "wamid": wamid, **payload})
        return 200, {
            "messaging_product": "whatsapp",
            "contacts": [{"input": payload.get("to"), "wa_id": payload.get("to")}],
            "messages": [{"id": wamid}],
        }

    def _graph_get(self, path: str, headers: Any) -> tuple[int, Any]:
        match = self.GRAPH_GET.match(path)
        assert match is not None
        token = headers.get("Authorization", "").removeprefix("Bearer ")
        if token != self.credentials["access_token"] or self.mode == "auth":
            return 401, {"error": {"message": "Invalid OAuth access token", "type": "OAuthException", "code": 190}}
        own = self.credentials["phone_number_id"]
        number = {"id": own, "display_phone_number": "+1 415-555-0100", "verified_name": "BAPBA Test"}
        if match.group(3):  # the business account's numbers
            self.record({"check": "phone_numbers", "account": match.group(2)})
            listed = self.listed_numbers if self.listed_numbers is not None else (own,)
            return 200, {"data": [{**number, "id": each} for each in listed]}
        self.record({"check": "phone_number", "id": match.group(2)})
        if match.group(2) != own:
            return 400, {"error": {"message": "Unsupported get request", "type": "GraphMethodException", "code": 100}}
        return 200, number


class TelegramPeer(HttpPeer):
    """POST /bot{token}/{method} of the Bot API: getMe and sendMessage."""

    PATH = re.compile(r"^/bot([^/]+)/(\w+)$")

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        match = self.PATH.match(path)
        if not match:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        token, api_method = match.groups()
        if token != self.credentials["bot_token"] or self.mode == "auth":
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        if headers.get("Content-Type", "").startswith("application/json"):
            params = json.loads(body or b"{}")
        else:
            params = {key: values[0] for key, values in parse_qs(body.decode()).items()}
        bot_id = int(token.partition(":")[0])
        if api_method == "getMe":
            return 200, {
                "ok": True,
                "result": {"id": bot_id, "is_bot": True, "first_name": "Test", "username": "test_bot"},
            }
        if api_method != "sendMessage":
            return 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        if self.mode == "reject":
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}
        if self.mode == "error":
            return 500, {"ok": False, "error_code": 500, "description": "Internal Server Error"}
        self.record({"chat_id": str(params.get("chat_id")), "text": params.get("text")})
        chat = str(params.get("chat_id"))
        chat_obj: dict[str, Any] = (
            {"id": -1001234567890, "type": "channel", "title": "c", "username": chat[1:]}
            if chat.startswith("@")
            else {"id": int(chat), "type": "private" if int(chat) > 0 else "group", "first_name": "S", "title": "g"}
        )
        return 200, {
            "ok": True,
            "result": {
                "message_id": len(self.received),
                "date": int(time.time()),
                "chat": chat_obj,
                "from": {"id": bot_id, "is_bot": True, "first_name": "Test"},
                "text": params.get("text"),
            },
        }


class WebhookReceiver(HttpPeer):
    """Another BAPBA service receiving events: checks each Standard Webhooks signature, keeps what verifies."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret=secret)
        self.refused = 0  # requests whose signature did not verify

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        from standardwebhooks import Webhook, WebhookVerificationError

        if method != "POST":
            return 405, {}
        if self.mode == "down":
            return 503, {"error": "down for maintenance"}
        try:
            event = Webhook(self.credentials["secret"]).verify(
                body, {key.lower(): value for key, value in headers.items()}
            )
        except WebhookVerificationError:
            self.refused += 1
            return 400, {"error": "bad signature"}
        self.record({"webhook_id": headers["webhook-id"], **event})
        return 204, b""
