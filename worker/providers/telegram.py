"""Telegram through python-telegram-bot's `Bot.send_message`."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
from telegram import Bot
from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.request import HTTPXRequest

from worker.providers.base import (
    AUTH_FAILED,
    DESTINATION_REJECTED,
    PROVIDER_ERROR,
    PROVIDER_UNREACHABLE,
    DeliveryError,
    OutgoingMessage,
    Provider,
    tls_context,
)


class TelegramProvider(Provider):
    type = "telegram"
    secret_fields = ("bot_token",)

    def secrets(self, config: dict[str, Any]) -> list[str]:
        token = str(config.get("bot_token") or "")
        return [token, token.partition(":")[2]] if token else []

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
        chat_id: int | str = int(destination) if destination.lstrip("-").isdigit() else destination
        try:
            _thread_runner().run(self._send(config["bot_token"], chat_id, message.text))
        except InvalidToken:
            raise DeliveryError(AUTH_FAILED, "Telegram rejected the bot token") from None
        except Forbidden as exc:
            raise DeliveryError(DESTINATION_REJECTED, f"Telegram: {exc.message}") from None
        except BadRequest as exc:
            raise DeliveryError(DESTINATION_REJECTED, f"Telegram: {exc.message}") from None
        except TimedOut:
            raise DeliveryError(PROVIDER_UNREACHABLE, "Telegram did not answer in time") from None
        except RetryAfter as exc:
            raise DeliveryError(PROVIDER_ERROR, f"Telegram: too many requests, retry after {exc.retry_after}") from None
        except NetworkError as exc:
            # PTB raises NetworkError both for a failed connection (from httpx) and for a 5xx answer.
            if isinstance(exc.__cause__, httpx.HTTPError):
                raise DeliveryError(PROVIDER_UNREACHABLE, "cannot reach Telegram") from None
            raise DeliveryError(PROVIDER_ERROR, f"Telegram failed: {exc.message}") from None
        except TelegramError as exc:
            raise DeliveryError(PROVIDER_ERROR, f"Telegram failed: {exc.message}") from None
        except TimeoutError:
            raise DeliveryError(
                PROVIDER_UNREACHABLE, f"Telegram did not finish within {self.settings.timeout:g} s"
            ) from None
        except Exception:  # an answer PTB could not turn into its objects
            raise DeliveryError(PROVIDER_ERROR, "Telegram sent an answer that could not be read") from None

    async def _send(self, token: str, chat_id: int | str, text: str) -> None:
        timeout = self.settings.timeout
        # The thread's one HTTP client serves both of Bot's request slots (getUpdates is never called).
        shared = _thread_request()
        bot = Bot(token, base_url=f"{self.settings.telegram_base_url}/bot", request=shared, get_updates_request=shared)
        # One call, no getMe first: Telegram answers sendMessage with 401 for a bad token and 400 for a bad
        # chat, which PTB turns into InvalidToken and BadRequest. Bot is not shut down: that would close the
        # thread's client.
        async with asyncio.timeout(timeout):
            await bot.send_message(
                chat_id=chat_id,
                text=text,
                connect_timeout=timeout,
                read_timeout=timeout,
                write_timeout=timeout,
                pool_timeout=timeout,
            )


# An event loop and an HTTP client per worker thread, kept between sends: building them for every message
# cost more CPU than the send itself, and a kept connection to Telegram saves a TLS handshake per message.
_per_thread = threading.local()


def _thread_runner() -> asyncio.Runner:
    runner = getattr(_per_thread, "runner", None)
    if runner is None:
        runner = _per_thread.runner = asyncio.Runner()
    return runner


def _thread_request() -> HTTPXRequest:
    request = getattr(_per_thread, "request", None)
    if request is None:
        request = _per_thread.request = HTTPXRequest(httpx_kwargs={"verify": tls_context()})
    return request
