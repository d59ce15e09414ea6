"""Provider peers on loopback, each run as its own process: `python -m bench.peers smtp|telegram [--delay S]`.

`smtp` is the test suite's aiosmtpd peer (AUTH required, no TLS). `telegram` speaks the two Bot API methods
the worker calls (getMe, sendMessage) on asyncio, so that it is never the bottleneck of a worker figure: it
answers sendMessage after `--delay` seconds without holding a thread. Both print `READY <port>` when they
listen, and stop on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from typing import Any
from urllib.parse import parse_qs

SMTP_USER, SMTP_PASSWORD = "bench-mailer", "bench-smtp-password"
TELEGRAM_TOKEN = "7012345678:AAHbenchTokenForTheLoopbackPeer1234"


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

    async def answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("kind", choices=["smtp", "telegram"])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering sendMessage")
    args = parser.parse_args(argv)
    if args.kind == "smtp":
        run_smtp()
    else:
        asyncio.run(run_telegram(args.delay))


if __name__ == "__main__":
    main(sys.argv[1:])
