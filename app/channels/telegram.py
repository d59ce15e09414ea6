"""Telegram through python-telegram-bot: `Bot.send_message` to send, `Bot.get_me` to check."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from app.channels.base import ChannelType, DeliveryError, OutgoingMessage, Provider, tls_context
from app.fields import FullMatch
from app.outcomes import AUTH_FAILED, DESTINATION_REJECTED, PROVIDER_ERROR, PROVIDER_UNREACHABLE

T = TypeVar("T")
CHAT = re.compile(r"-?[0-9]{1,20}|@[A-Za-z][A-Za-z0-9_]{3,31}")


class TelegramConfig(Schema):
    class Meta:
        unknown = RAISE

    provider = fields.String(required=True, validate=validate.Equal("telegram"))
    bot_token = fields.String(
        required=True,
        load_only=True,
        validate=FullMatch(
            r"^[0-9]{3,20}:[A-Za-z0-9_-]{20,100}$", error="Must be a Telegram bot token: <digits>:<token>."
        ),
    )


def chat_id(value: Any) -> str:
    """A numeric chat id (negative for groups) or an @channelname, or ValidationError."""
    text = value.strip() if isinstance(value, str) else ""
    if not CHAT.fullmatch(text):
        raise ValidationError("Must be a numeric chat id or an @channelname.")
    return text


def mask(chat: str) -> str:
    if chat.startswith("@"):
        return chat[:3] + "***"
    return "*" * max(len(chat) - 3, 0) + chat[-3:]


class TelegramProvider(Provider):
    secret_fields = ("bot_token",)

    def secrets(self, config: dict[str, Any]) -> list[str]:
        token = str(config.get("bot_token") or "")
        return [token, token.partition(":")[2]] if token else []

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> None:
        chat: int | str = int(destination) if destination.lstrip("-").isdigit() else destination
        # One call, no getMe first: Telegram answers sendMessage with 401 for a bad token and 400 for a bad
        # chat, which PTB turns into InvalidToken and BadRequest.
        self._run(config, lambda bot, limits: bot.send_message(chat_id=chat, text=message.text, **limits))

    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        me = self._run(config, lambda bot, limits: bot.get_me(**limits))
        return {"username": f"@{me.username}"} if getattr(me, "username", None) else {}

    def _run(self, config: dict[str, Any], call: Callable[[Any, dict[str, float]], Awaitable[T]]) -> T:
        from telegram.error import (
            BadRequest,
            Forbidden,
            InvalidToken,
            NetworkError,
            RetryAfter,
            TelegramError,
            TimedOut,
        )

        try:
            return _thread_runner().run(self._call(config["bot_token"], call))
        except InvalidToken:
            raise DeliveryError(AUTH_FAILED, "Telegram rejected the bot token") from None
        except (Forbidden, BadRequest) as exc:
            raise DeliveryError(DESTINATION_REJECTED, "Telegram", reply=exc.message) from None
        except TimedOut:
            raise DeliveryError(PROVIDER_UNREACHABLE, "Telegram did not answer in time") from None
        except RetryAfter as exc:
            seconds = exc.retry_after.total_seconds() if hasattr(exc.retry_after, "total_seconds") else exc.retry_after
            raise DeliveryError(
                PROVIDER_ERROR, f"Telegram: too many requests, retry after {seconds:g} s", retry_after=float(seconds)
            ) from None
        except NetworkError as exc:
            import httpx

            # PTB raises NetworkError both for a failed connection (from httpx) and for a 5xx answer.
            if isinstance(exc.__cause__, httpx.HTTPError):
                raise DeliveryError(PROVIDER_UNREACHABLE, "cannot reach Telegram") from None
            raise DeliveryError(PROVIDER_ERROR, "Telegram failed", reply=exc.message) from None
        except TelegramError as exc:
            raise DeliveryError(PROVIDER_ERROR, "Telegram failed", reply=exc.message) from None
        except TimeoutError:
            raise DeliveryError(
                PROVIDER_UNREACHABLE, f"Telegram did not finish within {self.settings.timeout:g} s"
            ) from None
        except Exception:  # an answer PTB could not turn into its objects
            raise DeliveryError(PROVIDER_ERROR, "Telegram sent an answer that could not be read") from None

    async def _call(self, token: str, call: Callable[[Any, dict[str, float]], Awaitable[T]]) -> T:
        from telegram import Bot

        timeout = self.settings.timeout
        # The thread's one HTTP client serves both of Bot's request slots (getUpdates is never called).
        # Bot is not shut down: that would close the thread's client.
        shared = _thread_request()
        bot = Bot(token, base_url=f"{self.settings.telegram_base_url}/bot", request=shared, get_updates_request=shared)
        limits = {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "write_timeout": timeout,
            "pool_timeout": timeout,
        }
        async with asyncio.timeout(timeout):
            return await call(bot, limits)


# An event loop and an HTTP client per worker thread, kept between sends: building them for every message
# cost more CPU than the send itself, and a kept connection to Telegram saves a TLS handshake per message.
_per_thread = threading.local()


def _thread_runner() -> asyncio.Runner:
    runner = getattr(_per_thread, "runner", None)
    if runner is None:
        runner = _per_thread.runner = asyncio.Runner()
    return runner


def _thread_request() -> Any:
    from telegram.request import HTTPXRequest

    request = getattr(_per_thread, "request", None)
    if request is None:
        request = _per_thread.request = HTTPXRequest(httpx_kwargs={"verify": tls_context()})
    return request


CHANNEL = ChannelType(
    name="telegram",
    config_schema=TelegramConfig,
    provider=TelegramProvider,
    recipient_field="telegram_chat_id",
    normalize=chat_id,
    mask=mask,
    # sendMessage takes 1 to 4,096 characters.
    max_text=4096,
)
