"""HTTP for the providers that speak it (Twilio, WhatsApp, Telegram): one client per worker thread, one total
deadline per call, a cap on what is read, and a record of whether the request may have reached the provider.

httpx's timeouts bound each operation, not the call: an answer dripped a byte at a time never trips them, and
name resolution has no timeout at all. So every call runs on the thread's event loop under `asyncio.timeout`,
which cancels it wherever it waits, DNS included, at the deadline. An answer is streamed and given up past
MAX_ANSWER_BYTES, so a hostile or broken provider cannot fill the worker's memory.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from app.channels.base import DeliveryError, Exchange, cookieless_jar, tls_context
from app.outcomes import CONFIG_INVALID, PROVIDER_ERROR, PROVIDER_UNREACHABLE

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")

# Far more than any answer of the APIs we call (a sent message's JSON is a few hundred bytes).
MAX_ANSWER_BYTES = 256 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes


class AnswerTooLarge(Exception):
    """The provider's answer went past MAX_ANSWER_BYTES."""


# An event loop and an HTTP client per worker thread, kept between calls: building them for every call cost more
# CPU than the call itself, and a kept connection saves a TCP and TLS handshake per message. An async client is
# used only on the loop it was made on, so each thread has both.
_per_thread = threading.local()


def _runner() -> asyncio.Runner:
    runner = getattr(_per_thread, "runner", None)
    if runner is None:
        runner = _per_thread.runner = asyncio.Runner()
    return runner


def thread_client() -> httpx.AsyncClient:
    """This thread's HTTP client (for a library that takes one, as python-telegram-bot's request does)."""
    client = getattr(_per_thread, "client", None)
    if client is None:
        import httpx  # the web process never calls a provider: the client library is loaded where it is used

        client = _per_thread.client = httpx.AsyncClient(
            follow_redirects=False, verify=tls_context(), cookies=cookieless_jar()
        )
    return client


def run_within(seconds: float, call: Callable[[], Awaitable[T]]) -> T:
    """`call()` on this thread's event loop, cancelled wherever it waits once `seconds` have passed (then
    TimeoutError): name resolution, connection, TLS, request and answer together."""

    async def bounded() -> T:
        async with asyncio.timeout(seconds):
            return await call()

    return _runner().run(bounded())


async def fetch(
    exchange: Exchange, method: str, url: str, *, timeout: float, auth: Any = None, **kwargs: Any
) -> Answer:
    """One request with this thread's client, read up to MAX_ANSWER_BYTES; `exchange` records how far it got."""

    async def trace(event: str, _info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.started"):
            exchange.request_out = True

    client = thread_client()
    request = client.build_request(method, url, timeout=timeout, extensions={"trace": trace}, **kwargs)
    response = await client.send(request, auth=auth, stream=True)
    try:
        exchange.statuses.append(response.status_code)
        if response.status_code >= 400:
            exchange.refused = True
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge()
    finally:
        await response.aclose()
    return Answer(response.status_code, response.headers, bytes(body))


def failure(exc: BaseException, exchange: Exchange, provider: str, seconds: float) -> DeliveryError:
    """The DeliveryError for a call to `provider` that failed with `exc`: one of HTTP's own, or anything else (an
    answer the client library could not read, say), which after a request went out may mean it was taken."""
    import httpx

    maybe_sent = exchange.maybe_sent
    if isinstance(exc, TimeoutError):
        return DeliveryError(
            PROVIDER_UNREACHABLE, f"{provider} did not finish within {seconds:g} s", maybe_sent=maybe_sent
        )
    if isinstance(exc, AnswerTooLarge):
        return DeliveryError(
            PROVIDER_ERROR, f"{provider} answered more than {MAX_ANSWER_BYTES // 1024} KiB", maybe_sent=maybe_sent
        )
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return DeliveryError(CONFIG_INVALID, f"the settings do not form a valid {provider} URL")
    if isinstance(exc, httpx.TimeoutException):
        return DeliveryError(PROVIDER_UNREACHABLE, f"{provider} did not answer in time", maybe_sent=maybe_sent)
    if isinstance(exc, httpx.HTTPError):
        if not exchange.request_out:
            return DeliveryError(PROVIDER_UNREACHABLE, f"cannot reach {provider}")
        return DeliveryError(
            PROVIDER_ERROR,
            f"the exchange with {provider} broke off ({type(exc).__name__})",
            maybe_sent=maybe_sent,
        )
    return DeliveryError(PROVIDER_ERROR, f"{provider} sent an answer that could not be read", maybe_sent=maybe_sent)
