"""The Slack connection: a Bolt `AsyncApp`, in Socket Mode (SLACK_APP_TOKEN) or
serving POST /slack/events on PORT (HTTP mode, requests signature-checked).

Decisions (which events are answered, their conversation, mrkdwn, splitting) live
in `adapters.slack.translate`; this module does the I/O. Bolt acknowledges events
before the listeners run, so generation never delays the ack; slash commands ack
first, then answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.app.async_server import AsyncSlackAppServer
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.middleware.assistant.async_assistant import AsyncAssistant
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack.translate import (
    HELP_TEXT,
    MESSAGE_LIMIT,
    PLATFORM,
    REFUSAL,
    Rules,
    Trigger,
    conversation_key,
    escape,
    is_direct,
    is_person_writing,
    mentions,
    reply_parts,
    reply_thread,
    to_message,
)
from bot import personas
from bot.dedupe import Dedupe, InProcessDedupe
from bot.engine import Engine, ReplyStream
from bot.inflight import InFlight
from bot.messages import ConversationKey, Message
from bot.ratelimit import RateLimiter, Verdict, rate_limit_note
from bot.settings import ConfigError, Settings
from bot.streaming import EditPacer, GrowingReply, play

log = logging.getLogger(__name__)

GREETING = "Hi! Ask me anything: I answer here, and remember this thread."
SUGGESTED_PROMPTS = [
    {"title": "Explain something", "message": "Explain how a rainbow forms, briefly."},
    {"title": "Brainstorm", "message": "Give me three names for a friendly robot."},
    {"title": "Write", "message": "Write a two-line poem about Mondays."},
]
UNFINISHED = "Sorry, I couldn't finish that reply."


class SlackAdapter:
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
        client = AsyncWebClient(
            token=settings.slack_bot_token.get_secret_value(),
            base_url=base_url or AsyncWebClient.BASE_URL,
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
        self.ready = asyncio.Event()
        self._register(settings.slack_assistant)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "run() first"
        return self._engine

    # --- events --------------------------------------------------------------------------

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
        self.app.error(self.on_error)

    async def on_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error("Slack handler failed (event %s)", body.get("event_id"), exc_info=error)

    async def on_mention(
        self, event: dict[str, Any], context: AsyncBoltContext, body: dict[str, Any]
    ) -> None:
        bot_user = context.bot_user_id or ""
        if is_person_writing(event, bot_user):
            await self._inflight.track(self._answer(event, body, bot_user, Trigger.MENTION))

    async def on_message(
        self, event: dict[str, Any], context: AsyncBoltContext, body: dict[str, Any]
    ) -> None:
        bot_user = context.bot_user_id or ""
        if not is_person_writing(event, bot_user):
            return
        if is_direct(event):
            why = Trigger.DIRECT
        elif mentions(event, bot_user):
            return  # the app_mention event for this message answers it
        elif event.get("thread_ts") and self.rules.thread_followups:
            # A follow-up in a thread the bot has answered in: its memory says so, in
            # any replica and after a restart.
            if not await self.engine.memory.history(conversation_key(event)):
                return
            why = Trigger.THREAD
        else:
            return
        await self._inflight.track(self._answer(event, body, bot_user, why))

    async def on_assistant_thread_started(self, say: Any, set_suggested_prompts: Any) -> None:
        await say(GREETING)
        await set_suggested_prompts(prompts=SUGGESTED_PROMPTS)

    async def on_assistant_message(
        self,
        event: dict[str, Any],
        context: AsyncBoltContext,
        body: dict[str, Any],
        set_status: Any,
    ) -> None:
        bot_user = context.bot_user_id or ""
        if not is_person_writing(event, bot_user):
            return
        await set_status("is thinking…")
        await self._inflight.track(self._answer(event, body, bot_user, Trigger.ASSISTANT))

    # --- answering --------------------------------------------------------------------------

    async def _answer(
        self, event: Mapping[str, Any], body: Mapping[str, Any], bot_user: str, why: Trigger
    ) -> None:
        channel = str(event.get("channel", ""))
        user = str(event.get("user", ""))
        thread = reply_thread(event)
        if not self._inflight.accepting:
            return
        # One answer per message, whatever the retries and replicas.
        if not await self.dedupe.first(f"{channel}:{event.get('ts')}"):
            log.debug(
                "Already answered %s:%s (event %s)", channel, event.get("ts"), body.get("event_id")
            )
            return
        if not self.rules.allows(user=user, channel=channel, is_direct=is_direct(event)):
            log.debug("Ignoring a %s from %s in %s: not allowed", why, user, channel)
            return
        verdict = self.limiter.check(user)
        if verdict is not Verdict.ALLOW:
            if verdict is Verdict.NOTIFY:
                note = rate_limit_note(self.limiter.retry_after(user))
                await self._post_text(channel, thread, note)
            return
        message = to_message(event, bot_user)
        if not message.text:
            await self._post_text(channel, thread, HELP_TEXT)
            return
        await self._stream(channel, thread, message, user, str(body.get("team_id") or ""))

    async def _stream(
        self, channel: str, thread: str | None, message: Message, user: str, team: str
    ) -> None:
        stream = self.engine.stream(message)
        try:
            if self.native_streaming and thread is not None:
                await self._stream_natively(stream, channel, thread, user, team)
            else:
                await play(stream, self._growing_reply(channel, thread))
        except SlackApiError as exc:
            log.warning(
                "Slack refused a reply in channel %s: %s",
                channel,
                exc.response.get("error", exc.response.status_code),
            )
            await stream.aclose()
            await self._post_text(channel, thread, UNFINISHED)

    def _growing_reply(self, channel: str, thread: str | None) -> GrowingReply[str]:
        """chat.postMessage for each part, then chat.update, paced per message."""
        client = self.app.client

        async def post(_index: int, part: str) -> str:
            response = await client.chat_postMessage(
                channel=channel, thread_ts=thread, text=part, unfurl_links=False
            )
            return str(response["ts"])

        async def edit(ts: str, part: str) -> object:
            return await client.chat_update(channel=channel, ts=ts, text=part)

        return GrowingReply(reply_parts, post, edit, self.pacer, lambda ts: ts)

    async def _stream_natively(
        self, stream: ReplyStream, channel: str, thread: str, user: str, team: str
    ) -> None:
        """Slack's streaming API for AI apps (chat.startStream/appendStream/stopStream).

        The text is escaped like mrkdwn, so model output can form no mention; past the
        length limit the reply goes on in a new streamed message.
        """
        client = self.app.client
        streamed = 0
        streamer = None
        try:
            async for chunk in stream:
                if streamer is None or streamed + len(chunk) > MESSAGE_LIMIT:
                    if streamer is not None:
                        await streamer.stop()
                    streamer = await client.chat_stream(
                        channel=channel,
                        thread_ts=thread,
                        recipient_user_id=user,
                        recipient_team_id=team or None,
                        buffer_size=64,
                    )
                    streamed = 0
                await streamer.append(markdown_text=escape(chunk))
                streamed += len(chunk)
        finally:
            await stream.aclose()
        if streamer is not None:
            await streamer.stop()

    async def _post_text(self, channel: str, thread: str | None, text: str) -> None:
        try:
            await self.app.client.chat_postMessage(channel=channel, thread_ts=thread, text=text)
        except SlackApiError as exc:
            log.warning(
                "Slack refused a message in channel %s: %s",
                channel,
                exc.response.get("error", exc.response.status_code),
            )

    # --- slash commands ---------------------------------------------------------------------

    def _command_allowed(self, command: Mapping[str, Any]) -> bool:
        channel = str(command.get("channel_id", ""))
        return self._inflight.accepting and self.rules.allows(
            user=str(command.get("user_id", "")),
            channel=channel,
            is_direct=channel.startswith("D"),
        )

    async def on_ask(
        self, ack: Any, command: dict[str, Any], respond: Any, body: dict[str, Any]
    ) -> None:
        await ack()  # within Slack's 3 s, before any generation
        user = str(command.get("user_id", ""))
        channel = str(command.get("channel_id", ""))
        question = str(command.get("text", "")).strip()
        if not self._command_allowed(command):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        if not question:
            await respond(text=HELP_TEXT, response_type="ephemeral")
            return
        if self.limiter.check(user) is not Verdict.ALLOW:
            await respond(
                text=rate_limit_note(self.limiter.retry_after(user)), response_type="ephemeral"
            )
            return
        try:
            root = await self.app.client.chat_postMessage(
                channel=channel, text=f"<@{user}> asked: {escape(question)}"
            )
        except SlackApiError as exc:
            log.warning("Slack refused /ask in channel %s: %s", channel, exc.response.get("error"))
            await respond(
                text="I can't post in this channel: invite me first (/invite).",
                response_type="ephemeral",
            )
            return
        thread = str(root["ts"])
        message = Message(
            conversation=ConversationKey(PLATFORM, channel, thread),
            author_id=user,
            author_name=str(command.get("user_name", user)),
            text=question,
            message_id=thread,
            is_direct=channel.startswith("D"),
        )
        await self._inflight.track(
            self._stream(channel, thread, message, user, str(body.get("team_id") or ""))
        )

    async def on_persona(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()
        if not self._command_allowed(command):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        parsed = personas.parse(str(command.get("text", "")))
        if parsed is None:
            await respond(text=personas.USAGE, response_type="ephemeral")
            return
        action, text = parsed
        if action != "show" and str(command.get("user_id")) not in self.settings.slack_admins:
            await respond(
                text="Only the admins in SLACK_ADMINS can change the persona.",
                response_type="ephemeral",
            )
            return
        key = ConversationKey(PLATFORM, str(command.get("channel_id", "")))
        answer = await personas.run(self.engine, key, action, text)
        await respond(text=escape(answer), response_type="ephemeral")

    async def on_reset(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()
        channel = str(command.get("channel_id", ""))
        if not self._command_allowed(command):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        if channel.startswith("D"):
            await self.engine.reset(ConversationKey(PLATFORM, channel))
            await respond(text="Done: I've forgotten our conversation.", response_type="ephemeral")
        else:
            await respond(
                text="In channels each thread is its own conversation: start a new thread "
                "to start afresh.",
                response_type="ephemeral",
            )

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
        await self.dedupe.close()
