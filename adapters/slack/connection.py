"""The Slack connection: a Bolt `AsyncApp`, in Socket Mode (SLACK_APP_TOKEN) or
serving POST /slack/events on PORT (HTTP mode, requests signature-checked).

Decisions (which events are answered, their conversation, their text, mrkdwn,
splitting) live in `adapters.slack.translate`, the reply buttons' blocks and payloads
in `adapters.slack.buttons`; the I/O is split by concern: this module's app and
lifecycle, `events` (messages in), `replies` (streaming them out), `commands` (slash
commands), `actions` (the buttons under replies), `files` (shared files), `names`
(people's display names, from users.info) and `context` (what they share). Bolt
acknowledges events before the listeners run, so generation never delays the ack;
slash commands and buttons ack first, then answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.app.async_server import AsyncSlackAppServer
from slack_bolt.middleware.assistant.async_assistant import AsyncAssistant
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.actions import ReplyButtons
from adapters.slack.buttons import ACTION_IDS
from adapters.slack.commands import SlashCommands
from adapters.slack.events import MessageEvents
from adapters.slack.names import UserNames
from adapters.slack.translate import (
    PLATFORM,
    Rules,
)
from bot.engine import Engine
from bot.inflight import InFlight
from bot.ratelimit import RateLimiter
from bot.settings import ConfigError, Settings
from bot.store.dedupe import Dedupe, InProcessDedupe
from bot.streaming import EditPacer

log = logging.getLogger(__name__)


class SlackAdapter(MessageEvents, SlashCommands, ReplyButtons):
    """Runs the bot on Slack until `stop` is set."""

    name = PLATFORM

    def __init__(
        self,
        settings: Settings,
        *,
        dedupe: Dedupe | None = None,
        base_url: str | None = None,
        edit_interval: float = 1.0,
        host: str = "0.0.0.0",  # HTTP mode serves Slack, from outside
    ) -> None:
        if settings.slack_bot_token is None:
            raise ConfigError("SLACK_BOT_TOKEN is not set")
        self.settings = settings
        self.rules = Rules.from_settings(settings)
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.pacer = EditPacer(edit_interval)
        self.dedupe = dedupe or InProcessDedupe()
        self.native_streaming = settings.slack_native_streaming
        self.host = host
        self.port = settings.port
        self._api_base = base_url or AsyncWebClient.BASE_URL
        client = AsyncWebClient(
            token=settings.slack_bot_token.get_secret_value(), base_url=self._api_base
        )
        # 429: wait for Retry-After and try again; 5xx: once more.
        client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=2))
        client.retry_handlers.append(AsyncServerErrorRetryHandler(max_retry_count=1))
        socket_mode = settings.slack_app_token is not None
        secret = settings.slack_signing_secret
        self.app = AsyncApp(
            client=client,
            signing_secret=secret.get_secret_value() if secret else None,
            # Socket Mode has no HTTP requests to sign.
            request_verification_enabled=not socket_mode,
        )
        self.socket_handler: AsyncSocketModeHandler | None = None
        if settings.slack_app_token is not None:
            self.socket_handler = AsyncSocketModeHandler(
                self.app, settings.slack_app_token.get_secret_value()
            )
        self.http_server: AsyncSlackAppServer | None = None
        self._runner: web.AppRunner | None = None
        self._engine: Engine | None = None
        self._inflight = InFlight("Slack", settings.shutdown_grace_seconds)
        self.names = UserNames(client)
        self._downloads: aiohttp.ClientSession | None = None  # at the first download
        self._warned_sign_in = False
        self.ready = asyncio.Event()
        self._register(settings.slack_assistant)

    # --- listeners --------------------------------------------------------------------------

    def _register(self, assistant_enabled: bool) -> None:
        if assistant_enabled:
            assistant = AsyncAssistant()
            assistant.thread_started(self.on_assistant_thread_started)
            assistant.user_message(self.on_assistant_message)
            self.app.use(assistant)
        self.app.event("app_mention")(self.on_mention)
        self.app.event("message")(self.on_message)
        self.app.command("/ask")(self.on_ask)
        self.app.command("/reset")(self.on_reset)
        self.app.command("/persona")(self.on_persona)
        self.app.command("/forget")(self.on_forget)
        self.app.command("/usage")(self.on_usage)
        for action_id in sorted(ACTION_IDS):  # the buttons under replies
            self.app.block_action(action_id)(self.on_button)
        self.app.error(self.on_error)

    async def on_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error("Slack handler failed (event %s)", body.get("event_id"), exc_info=error)

    # --- running -------------------------------------------------------------------------

    async def run(self, engine: Engine, stop: asyncio.Event) -> None:
        self._engine = engine
        if self.socket_handler is not None:
            await self.socket_handler.connect_async()  # type: ignore[no-untyped-call]
            log.info("Slack: connected in Socket Mode")
        else:
            self.http_server = AsyncSlackAppServer(
                port=self.port, path="/slack/events", app=self.app
            )
            self._runner = web.AppRunner(self.http_server.web_app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.port)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            log.info(
                "Slack: HTTP mode, events at POST http://%s:%d/slack/events", self.host, self.port
            )
        self.ready.set()
        try:
            await stop.wait()
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        await self._inflight.drain()
        if self.socket_handler is not None:
            with contextlib.suppress(Exception):
                await self.socket_handler.close_async()  # type: ignore[no-untyped-call]
        if self._runner is not None:
            await self._runner.cleanup()
        if self._downloads is not None:
            await self._downloads.close()
        await self.dedupe.close()
