"""The floor of the test-delivery figure: direct smtplib sends to the SMTP peer from one process.

`python -m bench.smtp_floor --port P --count N --concurrency C` does what the email provider does for one
test (connect, EHLO, AUTH, the same two-part message, QUIT) N times on C threads, and prints one JSON line
with the latency of each send in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import smtplib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.utils import make_msgid

from bench.peers import SMTP_PASSWORD, SMTP_USER

TEXT = "This is a test message from your BAPBA connector. If you can read it, the channel works."
HTML = "<p>This is a test message from your <b>BAPBA</b> connector. If you can read it, the channel works.</p>"


def send_one(port: int) -> float:
    started = time.perf_counter()
    message = EmailMessage()
    message["From"] = "noreply@bapba.example"
    message["To"] = "survivor@example.com"
    message["Subject"] = "BAPBA connector test"
    message["Message-ID"] = make_msgid(domain="bapba.example")
    message.set_content(TEXT)
    message.add_alternative(HTML, subtype="html")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login(SMTP_USER, SMTP_PASSWORD)
        client.send_message(message)
    return (time.perf_counter() - started) * 1000


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args(argv)

    send_one(args.port)  # warm the imports and the peer
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = [args.count // args.concurrency] * args.concurrency

    def loop(count: int) -> None:
        for _ in range(count):
            elapsed = send_one(args.port)
            with lock:
                latencies.append(elapsed)

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(loop, per_thread))
    print(json.dumps({"latencies_ms": latencies}))


if __name__ == "__main__":
    main(sys.argv[1:])
