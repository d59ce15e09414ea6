"""Peers on loopback, each run as its own process: `python -m bench.peers smtp|telegram|tarpit|tls-proxy`.

`smtp` is the test suite's aiosmtpd peer (AUTH required, no TLS). `telegram` speaks the two Bot API methods
the worker calls (getMe, sendMessage) on asyncio, so that it is never the bottleneck of a worker figure: it
answers sendMessage after `--delay` seconds without holding a thread. A message whose text holds `[k:KEY]`
has its receipt time (`time.monotonic()`, the same clock in every process of this machine) kept under KEY,
taken when its request has been read and before the delay: `GET /bench/receipt/KEY?timeout=S` answers with
it as soon as it is there, `GET /bench/receipts?prefix=P` hands over (and forgets) every receipt whose key
starts with P, with the count of keys that arrived more than once. `tarpit` accepts TCP connections and
never says a word (an SMTP server that hangs). `tls-proxy --target HOST:PORT` terminates TLS with a
self-signed certificate and pipes the bytes to the target (rediss:// in front of the plain Redis).
Each prints `READY <port>` when it listens, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

SMTP_USER, SMTP_PASSWORD = "bench-mailer", "bench-smtp-password"
TELEGRAM_TOKEN = "7012345678:AAHbenchTokenForTheLoopbackPeer1234"
RECEIPT_KEY = re.compile(r"\[k:([A-Za-z0-9_.-]{1,80})\]")


def receipt_text(key: str, text: str = "Your BAPBA code is 482913") -> str:
    """A message text whose receipt the Telegram peer keeps under `key`."""
    return f"{text} [k:{key}]"


def _announce(port: int) -> None:
    print(f"READY {port}", flush=True)


def run_smtp() -> None:
    import threading
    import warnings

    warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
    from tests.peers import SmtpPeer

    peer = SmtpPeer(SMTP_USER, SMTP_PASSWORD).start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    _announce(peer.port)
    try:
        while not stopped.wait(0.5):
            # Delivered messages are not needed here; keep the peer's record from growing without bound.
            with peer.lock:
                peer.received.clear()
    finally:
        peer.stop()


class _Telegram:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.sent = 0
        self.receipts: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        self.seen: set[str] = set()
        self.duplicates = 0

    def _receive(self, text: str) -> None:
        match = RECEIPT_KEY.search(text or "")
        if match is None:
            return
        key = match.group(1)
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        self.receipts[key] = time.monotonic()
        if (event := self.waiters.get(key)) is not None:
            event.set()

    async def bench(self, path: str) -> tuple[int, dict[str, Any]]:
        """The benchmark's questions: when did a message arrive."""
        parts = urlsplit(path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if parts.path.startswith("/bench/receipt/"):
            key = parts.path.removeprefix("/bench/receipt/")
            if key not in self.receipts:
                event = self.waiters.setdefault(key, asyncio.Event())
                try:
                    await asyncio.wait_for(event.wait(), float(query.get("timeout", "30")))
                except TimeoutError:
                    return 404, {"key": key}
                finally:
                    self.waiters.pop(key, None)
            return 200, {"key": key, "at": self.receipts.pop(key)}
        if parts.path == "/bench/receipts":
            prefix = query.get("prefix", "")
            taken = {key: at for key, at in self.receipts.items() if key.startswith(prefix)}
            if query.get("keep") != "1":
                for key in taken:
                    del self.receipts[key]
            return 200, {"receipts": taken, "duplicates": self.duplicates}
        return 404, {}

    async def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        if path.startswith("/bench/"):
            return await self.bench(path)
        token, _, method = path.removeprefix("/bot").partition("/")
        if token != TELEGRAM_TOKEN:
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        bot_id = int(token.partition(":")[0])
        if method == "getMe":
            return 200, {"ok": True, "result": {"id": bot_id, "is_bot": True, "first_name": "B", "username": "b_bot"}}
        if method != "sendMessage":
            return 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        if headers.get("content-type", "").startswith("application/json"):
            params = json.loads(body or b"{}")
        else:
            params = {key: values[0] for key, values in parse_qs(body.decode()).items()}
        self._receive(str(params.get("text", "")))
        await asyncio.sleep(self.delay)
        self.sent += 1
        chat = int(params.get("chat_id", 0))
        return 200, {
            "ok": True,
            "result": {
                "message_id": self.sent,
                "date": int(time.time()),
                "chat": {"id": chat, "type": "private", "first_name": "S"},
                "from": {"id": bot_id, "is_bot": True, "first_name": "B"},
                "text": params.get("text"),
            },
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                _method, path, _version = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, payload = await self.answer(path, headers, body)
                data = json.dumps(payload).encode()
                head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                writer.write(head.encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def run_telegram(delay: float) -> None:
    peer = _Telegram(delay)
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0, backlog=1024)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    _announce(server.sockets[0].getsockname()[1])
    async with server:
        await stopped.wait()


async def run_tarpit() -> None:
    """Accept, read and discard, never answer: the SMTP client waits for a greeting that never comes."""
    held: set[asyncio.StreamWriter] = set()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.add(writer)
        try:
            while await reader.read(4096):
                pass
        except ConnectionError:
            pass
        finally:
            held.discard(writer)
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0, backlog=1024)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    _announce(server.sockets[0].getsockname()[1])
    async with server:
        await stopped.wait()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key_file


async def run_tls_proxy(target: str) -> None:
    """TLS on the outside, the target's plain protocol inside: rediss:// for a Redis that has no TLS."""
    host, _, port = target.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as folder:  # read once, then gone
        context.load_cert_chain(*_self_signed(Path(folder)))

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def serve(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context, backlog=1024)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    _announce(server.sockets[0].getsockname()[1])
    async with server:
        await stopped.wait()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("kind", choices=["smtp", "telegram", "tarpit", "tls-proxy"])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering sendMessage")
    parser.add_argument("--target", default="127.0.0.1:6379", help="tls-proxy: where to pipe the bytes")
    args = parser.parse_args(argv)
    if args.kind == "smtp":
        run_smtp()
    elif args.kind == "telegram":
        asyncio.run(run_telegram(args.delay))
    elif args.kind == "tarpit":
        asyncio.run(run_tarpit())
    else:
        asyncio.run(run_tls_proxy(args.target))


if __name__ == "__main__":
    main(sys.argv[1:])
