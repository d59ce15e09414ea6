"""Telegram through python-telegram-bot: `Bot.send_message` to send, `Bot.get_me` to check."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from app.channels.base import ChannelType, DeliveryError, Exchange, OutgoingMessage, Provider
from app.channels.http import failure, fetch, run_within
from app.fields import FullMatch
from app.outcomes import AUTH_FAILED, DESTINATION_REJECTED, PROVIDER_ERROR

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

    def send(self, config: dict[str, Any], destination: str, message: OutgoingMessage) -> str | None:
        chat: int | str = int(destination) if destination.lstrip("-").isdigit() else destination
        # One call, no getMe first: Telegram answers sendMessage with 401 for a bad token and 400 for a bad
        # chat, which PTB turns into InvalidToken and BadRequest.
        sent = self._run(config, lambda bot, limits: bot.send_message(chat_id=chat, text=message.text, **limits))
        return str(sent.message_id) if getattr(sent, "message_id", None) is not None else None

    def verify(self, config: dict[str, Any]) -> dict[str, str]:
        me = self._run(config, lambda bot, limits: bot.get_me(**limits))
        return {"username": f"@{me.username}"} if getattr(me, "username", None) else {}

    def _run(self, config: dict[str, Any], call: Callable[[Any, dict[str, float]], Awaitable[T]]) -> T:
        from telegram import Bot
        from telegram.error import BadRequest, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError

        timeout = self.settings.timeout
        exchange = Exchange()
        # One request object serves both of Bot's request slots (getUpdates is never called); it is not shut
        # down, as the thread's HTTP client under it stays for the next call.
        request = _request_class()(exchange, timeout)
        bot = Bot(
            config["bot_token"],
            base_url=f"{self.settings.telegram_base_url}/bot",
            request=request,
            get_updates_request=request,
        )
        limits = {
            "connect_timeout": timeout,
            "read_timeout": timeout,
            "write_timeout": timeout,
            "pool_timeout": timeout,
        }
        try:
            return run_within(timeout, lambda: call(bot, limits))
        except InvalidToken:
            raise DeliveryError(AUTH_FAILED, "Telegram rejected the bot token") from None
        except (Forbidden, BadRequest) as exc:
            raise DeliveryError(DESTINATION_REJECTED, "Telegram", reply=exc.message) from None
        except RetryAfter as exc:
            seconds = exc.retry_after.total_seconds() if hasattr(exc.retry_after, "total_seconds") else exc.retry_after
            raise DeliveryError(
                PROVIDER_ERROR, f"Telegram: too many requests, retry after {seconds:g} s", retry_after=float(seconds)
            ) from None
        except NetworkError as exc:
            # PTB wraps what the HTTP layer raised (a failed connection, a timeout) in NetworkError, and raises
            # it for a 5xx answer too.
            if exc.__cause__ is not None:
                raise failure(exc.__cause__, exchange, "Telegram", timeout) from None
            raise DeliveryError(
                PROVIDER_ERROR, "Telegram failed", reply=exc.message, maybe_sent=exchange.maybe_sent
            ) from None
        except TelegramError as exc:  # e.g. a success whose body is not JSON: it may have gone
            raise DeliveryError(
                PROVIDER_ERROR, "Telegram failed", reply=exc.message, maybe_sent=exchange.maybe_sent
            ) from None
        except Exception as exc:  # HTTP's own, or an answer PTB could not turn into its objects
            raise failure(exc, exchange, "Telegram", timeout) from None


@functools.cache
def _request_class() -> type:
    """python-telegram-bot's documented networking interface (BaseRequest), built on the thread's HTTP client:
    one connection pool per worker thread, one deadline per call, a capped answer."""
    from telegram.request import BaseRequest, RequestData

    class Request(BaseRequest):
        def __init__(self, exchange: Exchange, timeout: float) -> None:
            self.exchange, self.timeout = exchange, timeout

        @property
        def read_timeout(self) -> float:
            return self.timeout

        async def initialize(self) -> None:
            pass

        async def shutdown(self) -> None:
            pass

        async def do_request(
            self, url: str, method: str, request_data: RequestData | None = None, **_timeouts: Any
        ) -> tuple[int, bytes]:
            if request_data is not None and request_data.contains_files:
                raise ValueError("files are never sent")
            data = request_data.json_parameters if request_data else None
            answer = await fetch(self.exchange, method, url, data=data, timeout=self.timeout)
            return answer.status, answer.body

    return Request


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
