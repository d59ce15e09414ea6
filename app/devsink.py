"""A development provider sink: one HTTP server that plays the Twilio Messages API, the WhatsApp Cloud API and
the Telegram Bot API, takes any credentials of the right shape, and prints each message it receives.

For a laptop only. With TWILIO_API_BASE_URL, WHATSAPP_API_BASE_URL and TELEGRAM_API_BASE_URL pointing at it, the
real client libraries send to it and `/verify` checks against it, with no provider account anywhere. As Twilio
does for its test credentials, it refuses a few documented "magic" numbers, so that a failure and the fallback
to the next connector can be seen too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import click

MAX_BODY_BYTES = 1024 * 1024
Answer = Callable[[str, str, Mapping[str, str], bytes], tuple[int, Any]]

# Credentials of the right shape, as the connector configs accept them.
ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
KEY_SID = re.compile(r"(SK|AC)[0-9a-fA-F]{32}")
BOT_TOKEN = re.compile(r"[0-9]{3,20}:[A-Za-z0-9_-]{20,100}")
E164 = re.compile(r"\+[1-9][0-9]{6,14}")

# Twilio's test credentials answer these numbers with these errors (Twilio docs, "Test credentials").
TWILIO_MAGIC_TO = {
    "+15005550001": (21211, "The 'To' number +15005550001 is not a valid phone number."),
    "+15005550002": (21612, "The 'To' phone number is not currently reachable via SMS."),
    "+15005550003": (21408, "Permission to send an SMS has not been enabled for the region indicated by the 'To'"),
    "+15005550004": (21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (21614, "'To' number is not a valid mobile number"),
}
TWILIO_MAGIC_FROM = {
    "+15005550001": (21212, "The 'From' number +15005550001 is not a valid phone number."),
    "+15005550007": (21606, "The 'From' phone number provided is not a valid message-capable Twilio phone number."),
}

TWILIO_PATH = re.compile(r"/2010-04-01/Accounts/(?P<account>[^/]+?)(?P<edge>/Messages|/IncomingPhoneNumbers)?\.json")
GRAPH_PATH = re.compile(
    r"/(?P<version>v[0-9]{1,3}\.[0-9]{1,3})/(?P<node>[0-9]{1,32})(?P<edge>/messages|/phone_numbers)?"
)
TELEGRAM_PATH = re.compile(r"/bot(?P<token>[^/]*)/(?P<method>[A-Za-z]+)")


class BadRequest(ValueError):
    """A request body that cannot be read."""


def json_http_server(answer: Answer, host: str, port: int, max_body: int = MAX_BODY_BYTES) -> ThreadingHTTPServer:
    """A threaded HTTP/1.1 server on (host, port) whose every GET and POST is answered by
    `answer(method, target, headers, body)` -> (status, JSON-able payload or raw bytes). Not started."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds a silent connection is kept

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the library's name)
            pass  # a request line holds the Telegram bot token: never printed

        def _reply(self, status: int, payload: Any) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up first

        def _handle(self) -> None:
            raw_length = self.headers.get("Content-Length") or "0"
            if not (raw_length.isascii() and raw_length.isdigit()):
                self.close_connection = True
                return self._reply(400, {"error": "Content-Length must be a number"})
            if int(raw_length) > max_body:
                self.close_connection = True
                return self._reply(413, {"error": f"request bodies are limited to {max_body} bytes"})
            body = self.rfile.read(int(raw_length)) if int(raw_length) else b""
            try:
                status, payload = answer(self.command, self.path, self.headers, body)
            except BadRequest as exc:
                status, payload = 400, {"error": str(exc)}
            self._reply(status, payload)

        def _not_allowed(self) -> None:
            self._reply(405, {"error": f"{self.command} is not supported here"})

        def do_HEAD(self) -> None:  # noqa: N802 (the library's name)
            self.send_response(405)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _handle  # noqa: N815
        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class ProviderSink:
    """The three providers' answers; `echo` receives one text per message or check (never a credential)."""

    def __init__(self, echo: Callable[[str], None] = click.echo) -> None:
        self._echo = echo
        self._lock = threading.Lock()
        self._serial = itertools.count(1)
        # The WhatsApp phone number ids asked about with each access token (by digest): a business account
        # "lists" what its token was used for, so that `/verify` finds any configured number.
        self._numbers: dict[str, set[str]] = {}

    def __call__(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if match := TWILIO_PATH.fullmatch(parts.path):
            return self._twilio(method, match["account"], match["edge"], query, headers, body)
        if match := GRAPH_PATH.fullmatch(parts.path):
            return self._whatsapp(method, match["node"], match["edge"], query, headers, body)
        if match := TELEGRAM_PATH.fullmatch(parts.path):
            return self._telegram(match["token"], match["method"], query, headers, body)
        return 404, {"error": "not a Twilio, WhatsApp Cloud or Telegram Bot API path"}

    def _show(self, text: str) -> None:
        with self._lock:  # one message's lines together
            self._echo(text)

    # --- Twilio -----------------------------------------------------------------------------------------

    def _twilio(
        self,
        method: str,
        account: str,
        edge: str | None,
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, Any]:
        if not ACCOUNT_SID.fullmatch(account):
            return 404, twilio_error(404, 20404, "The requested resource was not found")
        user, secret = _basic_auth(headers)
        if not (KEY_SID.fullmatch(user) and secret and (not user.startswith("AC") or user == account)):
            return 401, twilio_error(401, 20003, "Authenticate")
        if method == "POST" and edge == "/Messages":
            return self._twilio_send(account, _form(body))
        if method == "GET" and edge is None:
            self._show("--- check: Twilio account (Twilio API)")
            return 200, {"sid": account, "friendly_name": "Provider sink", "status": "active", "type": "Full"}
        if method == "GET" and edge == "/IncomingPhoneNumbers":
            wanted = query.get("PhoneNumber")
            numbers = [wanted] if wanted and E164.fullmatch(wanted) else []
            self._show(f"--- check: Twilio incoming number {wanted or '(none asked)'} (Twilio API)")
            return 200, twilio_numbers_page(
                account, numbers, f"/2010-04-01/Accounts/{account}/IncomingPhoneNumbers.json"
            )
        return 405, twilio_error(405, 20004, "Method not allowed")

    def _twilio_send(self, account: str, form: dict[str, str]) -> tuple[int, Any]:
        to, sender, text = form.get("To", ""), form.get("From", ""), form.get("Body", "")
        if not to:
            return 400, twilio_error(400, 21604, "A 'To' phone number is required.")
        if not sender:
            return 400, twilio_error(400, 21603, "A 'From' phone number is required.")
        if not text:
            return 400, twilio_error(400, 21602, "Message body is required.")
        if len(text) > 1600:
            return 400, twilio_error(400, 21617, "The concatenated message body exceeds the 1600 character limit.")
        refusal = TWILIO_MAGIC_FROM.get(sender) or TWILIO_MAGIC_TO.get(to)
        if refusal is None and not E164.fullmatch(to):
            refusal = (21211, f"The 'To' number {to} is not a valid phone number.")
        if refusal is not None:
            code, words = refusal
            self._show(f"--- sms from {sender} to {to} refused: Twilio error {code}, {words}")
            return 400, twilio_error(400, code, words)
        self._show(f"--- sms from {sender} to {to} (Twilio Messages API)\n{text}")
        return 201, twilio_message(account, f"SM{next(self._serial):032x}", to, sender, text)

    # --- WhatsApp Cloud API -----------------------------------------------------------------------------

    def _whatsapp(
        self, method: str, node: str, edge: str | None, query: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        token = headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not token:
            return 401, graph_error("Invalid OAuth access token - Cannot parse access token", 190, "OAuthException")
        numbers = self._numbers_of(token)
        if method == "POST" and edge == "/messages":
            with self._lock:
                numbers.add(node)
            return self._whatsapp_send(node, _json(body))
        if method == "GET" and edge is None:
            with self._lock:
                numbers.add(node)
            self._show(f"--- check: WhatsApp phone number id {node} (WhatsApp Cloud API)")
            fields = [name for name in query.get("fields", "").split(",") if name]
            number = whatsapp_number(node)
            return 200, {key: value for key, value in number.items() if key == "id" or not fields or key in fields}
        if method == "GET" and edge == "/phone_numbers":
            with self._lock:
                listed = sorted(numbers)
            self._show(f"--- check: WhatsApp business account {node} lists {', '.join(listed) or 'no number'}")
            return 200, {"data": [whatsapp_number(each) for each in listed]}
        return 400, graph_error(f"Unsupported {method.lower()} request.", 100, "GraphMethodException")

    def _numbers_of(self, token: str) -> set[str]:
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            if key not in self._numbers and len(self._numbers) >= 10_000:
                self._numbers.clear()  # a laptop's sink: bounded, not clever
            return self._numbers.setdefault(key, set())

    def _whatsapp_send(self, node: str, payload: Any) -> tuple[int, Any]:
        if not isinstance(payload, dict) or payload.get("messaging_product") != "whatsapp":
            return 400, graph_error("(#100) The parameter messaging_product is required.", 100, "OAuthException")
        to = str(payload.get("to") or "")
        if not to.lstrip("+").isdigit():
            return 400, graph_error("(#100) Invalid parameter", 100, "OAuthException")
        kind = payload.get("type", "text")
        if kind == "text" and isinstance(payload.get("text"), dict) and payload["text"].get("body"):
            shown = str(payload["text"]["body"])
        elif kind == "template" and isinstance(payload.get("template"), dict) and payload["template"].get("name"):
            template = payload["template"]
            language = template.get("language") if isinstance(template.get("language"), dict) else {}
            shown = f"(template {template['name']}, {language.get('code', 'en_US')})"
        else:
            return 400, graph_error("(#100) Param text['body'] is required", 100, "OAuthException")
        self._show(f"--- whatsapp from phone number id {node} to +{to.lstrip('+')} (WhatsApp Cloud API)\n{shown}")
        return 200, {
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": to.lstrip("+")}],
            "messages": [{"id": f"wamid.sink{next(self._serial):020d}"}],
        }

    # --- Telegram Bot API -------------------------------------------------------------------------------

    def _telegram(
        self, token: str, method: str, query: dict[str, str], headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Any]:
        if not BOT_TOKEN.fullmatch(token):
            return 401, telegram_error(401, "Unauthorized")
        if headers.get("Content-Type", "").startswith("application/json"):
            params = _json(body)
            if not isinstance(params, dict):
                return 400, telegram_error(400, "Bad Request: parameters must be a JSON object")
        else:
            params = {**query, **_form(body)}
        bot_id = int(token.partition(":")[0])
        if method == "getMe":
            self._show("--- check: Telegram getMe (Telegram Bot API)")
            return 200, {"ok": True, "result": telegram_bot(bot_id)}
        if method != "sendMessage":
            return 404, telegram_error(404, "Not Found")
        chat, text = str(params.get("chat_id") or ""), str(params.get("text") or "")
        if not chat:
            return 400, telegram_error(400, "Bad Request: chat_id is empty")
        if not re.fullmatch(r"-?[0-9]{1,20}|@[A-Za-z][A-Za-z0-9_]{3,31}", chat):
            return 400, telegram_error(400, "Bad Request: chat not found")
        if not text.strip():
            return 400, telegram_error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return 400, telegram_error(400, "Bad Request: message is too long")
        self._show(f"--- telegram to chat {chat} (Telegram Bot API)\n{text}")
        return 200, {"ok": True, "result": telegram_message(next(self._serial), bot_id, chat, text)}


# --- the providers' answers, as their client libraries read them --------------------------------------------


def twilio_error(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def twilio_message(account: str, sid: str, to: str, sender: str, text: str) -> dict[str, Any]:
    return {
        "sid": sid,
        "account_sid": account,
        "to": to,
        "from": sender,
        "body": text,
        "status": "queued",
        "num_segments": "1",
        "direction": "outbound-api",
        "api_version": "2010-04-01",
        "date_created": time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()),
        "uri": f"/2010-04-01/Accounts/{account}/Messages/{sid}.json",
    }


def twilio_numbers_page(account: str, numbers: list[str], path: str) -> dict[str, Any]:
    return {
        "incoming_phone_numbers": [
            {"sid": "PN" + "0" * 32, "account_sid": account, "phone_number": n, "friendly_name": n} for n in numbers
        ],
        "page": 0, "page_size": 50, "first_page_uri": path, "next_page_uri": None, "previous_page_uri": None,
        "uri": path, "start": 0, "end": len(numbers),
    }  # fmt: skip


def graph_error(message: str, code: int, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code, "fbtrace_id": "Asink"}}


def whatsapp_number(phone_number_id: str) -> dict[str, str]:
    return {"id": phone_number_id, "display_phone_number": "+1 555-0100", "verified_name": "Provider sink"}


def telegram_error(code: int, description: str) -> dict[str, Any]:
    return {"ok": False, "error_code": code, "description": description}


def telegram_bot(bot_id: int) -> dict[str, Any]:
    return {"id": bot_id, "is_bot": True, "first_name": "Provider sink", "username": "provider_sink_bot"}


def telegram_message(message_id: int, bot_id: int, chat: str, text: str) -> dict[str, Any]:
    chat_obj: dict[str, Any] = (
        {"id": -1001234567890, "type": "channel", "title": chat[1:], "username": chat[1:]}
        if chat.startswith("@")
        else {"id": int(chat), "type": "private" if int(chat) > 0 else "group", "first_name": "S", "title": "g"}
    )
    return {
        "message_id": message_id,
        "date": int(time.time()),
        "chat": chat_obj,
        "from": {"id": bot_id, "is_bot": True, "first_name": "Provider sink"},
        "text": text,
    }


def _basic_auth(headers: Mapping[str, str]) -> tuple[str, str]:
    scheme, _, encoded = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        user, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return user, secret


def _form(body: bytes) -> dict[str, str]:
    try:
        return {key: values[0] for key, values in parse_qs(body.decode(), keep_blank_values=True).items()}
    except UnicodeDecodeError:
        raise BadRequest("the form body is not UTF-8") from None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except ValueError:
        raise BadRequest("the body is not JSON") from None


def run_provider_sink(host: str, port: int) -> None:
    server = json_http_server(ProviderSink(), host, port)
    base = f"http://{host}:{server.server_address[1]}"
    click.echo(f"provider sink on {base}: Twilio, WhatsApp Cloud and Telegram Bot APIs; any credentials of the")
    click.echo("right shape; Twilio's magic numbers refused as with its test credentials; Ctrl-C to stop. Settings:")
    for name in ("TWILIO_API_BASE_URL", "WHATSAPP_API_BASE_URL", "TELEGRAM_API_BASE_URL"):
        click.echo(f"{name}={base}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
