"""The Slack connection: a Bolt `AsyncApp`, in Socket Mode (SLACK_APP_TOKEN) or
serving POST /slack/events on PORT (HTTP mode, requests signature-checked).

Decisions (which events are answered, their conversation, their text, mrkdwn,
splitting) live in `adapters.slack.translate`; this module does the I/O: the Web API,
people's display names (users.info, cached) and the files shared with a message
(downloaded with the bot token). Bolt acknowledges events before the listeners run,
so generation never delays the ack; slash commands ack first, then answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
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

from adapters.bounded import RecentMap
from adapters.slack.translate import (
    CANNOT_POST,
    HELP_TEXT,
    MESSAGE_LIMIT,
    NEUTRAL_NAME,
    PLATFORM,
    REFUSAL,
    Rules,
    Trigger,
    command_place,
    command_text,
    conversation_key,
    escape,
    file_ref,
    is_direct,
    is_empty,
    is_person_writing,
    is_slack_file_url,
    mentioned_users,
    mentions,
    reply_parts,
    reply_thread,
    shared_files,
    to_message,
    unavailable_note,
    user_name,
)
from bot import forgetting, personas
from bot.attachments import FileRef, ReadFiles, read_files
from bot.engine import COMMAND_FAILED, Engine, ReplyStream
from bot.inflight import InFlight
from bot.messages import ConversationKey, Message
from bot.ratelimit import RateLimiter, Verdict, rate_limit_note
from bot.settings import ConfigError, Settings
from bot.store.dedupe import Dedupe, InProcessDedupe
from bot.streaming import EditPacer, GrowingReply, play

log = logging.getLogger(__name__)

GREETING = "Hi! Ask me anything: I answer here, and remember this thread."
SUGGESTED_PROMPTS = [
    {"title": "Explain something", "message": "Explain how a rainbow forms, briefly."},
    {"title": "Brainstorm", "message": "Give me three names for a friendly robot."},
    {"title": "Write", "message": "Write a two-line poem about Mondays."},
]
UNFINISHED = "Sorry, I couldn't finish that reply."
THINKING = "is thinking…"
# Display names: kept an hour (a renamed person is seen by then), a failed look-up a
# minute (so that a missing users:read scope or an outage costs one call a minute per
# person, and names come back soon after it ends).
NAMES_KEPT = 10_000
NAMES_SECONDS = 3600.0
FAILED_NAME_SECONDS = 60.0
NAME_LOOKUP_SECONDS = 5.0  # a reply never waits longer than this for a name


class DownloadError(Exception):
    """A file download that Slack refused or answered with something else; `status`:
    the HTTP status of a refusal (read_files logs it)."""

    def __init__(self, why: str, status: int | None = None) -> None:
        super().__init__(why)
        self.status = status


NAME_LOOKUPS_AT_ONCE = 8


class UserNames:
    """People's display names by Slack user id, from users.info, in a bounded cache.

    Concurrent messages from one person share one look-up. A failed look-up gives no
    name (the translation then says NEUTRAL_NAME) and is retried after a minute; the
    first failure is a warning, later ones are debug lines.
    """

    def __init__(
        self,
        client: AsyncWebClient,
        *,
        capacity: int = NAMES_KEPT,
        ttl: float = NAMES_SECONDS,
        failed_ttl: float = FAILED_NAME_SECONDS,
        timeout: float = NAME_LOOKUP_SECONDS,
    ) -> None:
        self.client = client
        self.failed_ttl = failed_ttl
        self.timeout = timeout
        self._cache: RecentMap[str, str] = RecentMap(capacity, ttl)  # "": failed
        self._pending: dict[str, asyncio.Future[str]] = {}
        self._warned = False
        self._slots = asyncio.Semaphore(NAME_LOOKUPS_AT_ONCE)  # Slack rate-limits users.info

    async def of(self, user_ids: Iterable[str]) -> dict[str, str]:
        """The names known of `user_ids` (those that could not be looked up left out)."""
        wanted = sorted({u for u in user_ids if u})
        found = await asyncio.gather(*map(self.name, wanted))
        return {user: name for user, name in zip(wanted, found, strict=True) if name}

    async def name(self, user_id: str) -> str:
        """The person's display name, or "" if Slack would not say."""
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        pending = self._pending.get(user_id)
        if pending is None:
            pending = asyncio.ensure_future(self._look_up(user_id))
            self._pending[user_id] = pending
            pending.add_done_callback(lambda _: self._pending.pop(user_id, None))
        # Shielded: one waiter cancelled (its reply stopped) leaves the others' look-up.
        return await asyncio.shield(pending)

    async def _look_up(self, user_id: str) -> str:
        try:
            async with self._slots:
                response = await asyncio.wait_for(
                    self.client.users_info(user=user_id), self.timeout
                )
            name = user_name(response.get("user") or {})
            why = "no name in its answer"
        except SlackApiError as exc:
            name, why = "", str(exc.response.get("error", exc.response.status_code))
        except Exception as exc:  # a timeout, the network: a name never costs the reply
            name, why = "", type(exc).__name__
        if name:
            self._cache.put(user_id, name)
            return name
        self._cache.put(user_id, "", ttl=self.failed_ttl)
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(
            level,
            "Slack users.info failed (%s): people are named %r to the model until it "
            "works (is the users:read scope granted?)",
            why,
            NEUTRAL_NAME,
        )
        return ""


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
        self.app.command("/forget")(self.on_forget)
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
            # any replica and after a restart. Looked up only for a message the bot
            # may answer.
            if not self._event_allowed(event):
                return
            if not await self.engine.memory.history(conversation_key(event)):
                return
            why = Trigger.THREAD
        else:
            return
        await self._inflight.track(self._answer(event, body, bot_user, why))

    async def on_assistant_thread_started(
        self, event: dict[str, Any], say: Any, set_suggested_prompts: Any
    ) -> None:
        thread = event.get("assistant_thread") or {}
        allowed = self.rules.allows(
            user=str(thread.get("user_id", "")),
            channel=str(thread.get("channel_id", "")),
            is_direct=True,  # the assistant panel is a DM with the bot
        )
        if not allowed:
            await say(REFUSAL)
            return
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
        await self._inflight.track(
            self._answer(event, body, bot_user, Trigger.ASSISTANT, set_status)
        )

    # --- answering --------------------------------------------------------------------------

    def _event_allowed(self, event: Mapping[str, Any]) -> bool:
        return self.rules.allows(
            user=str(event.get("user", "")),
            channel=str(event.get("channel", "")),
            is_direct=is_direct(event),
        )

    async def _answer(
        self,
        event: Mapping[str, Any],
        body: Mapping[str, Any],
        bot_user: str,
        why: Trigger,
        set_status: Any = None,
    ) -> None:
        """Answer one message: access, once only, rate limit, then the reply. The
        assistant's "is thinking…" shows only once the message will be answered."""
        channel = str(event.get("channel", ""))
        user = str(event.get("user", ""))
        thread = reply_thread(event)
        if not self._inflight.accepting:
            return
        if not self._event_allowed(event):
            log.debug("Ignoring a %s from %s in %s: not allowed", why, user, channel)
            return
        # One answer per message, whatever the retries and replicas.
        if not await self.dedupe.first(f"{channel}:{event.get('ts')}"):
            log.debug(
                "Already answered %s:%s (event %s)", channel, event.get("ts"), body.get("event_id")
            )
            return
        verdict = self.limiter.check(user)
        if verdict is not Verdict.ALLOW:
            if verdict is Verdict.NOTIFY:
                note = rate_limit_note(self.limiter.retry_after(user))
                await self._post_text(channel, thread, note)
            return
        if is_empty(event, bot_user):
            await self._post_text(channel, thread, escape(HELP_TEXT))  # `<question>`: text
            return
        if set_status is not None:
            await self._set_status(set_status, THINKING)
        # Names and files only now, for a message that will be answered.
        names, attached = await asyncio.gather(
            self.names.of([user, *mentioned_users(event.get("text") or "", bot_user)]),
            self._read_files(event, channel),
        )
        message = to_message(event, bot_user, names, attached)
        posted = await self._stream(channel, thread, message, user, str(body.get("team_id") or ""))
        if set_status is not None and not posted:
            # A reply clears the status; with none posted it would stay for good.
            await self._set_status(set_status, "")

    async def _read_files(self, event: Mapping[str, Any], channel: str) -> ReadFiles:
        """The text files shared with the message, and notes about the others."""
        shared = shared_files(event)
        refs = list(shared.refs)
        unavailable = shared.unavailable
        for found in await asyncio.gather(*map(self._file_info, shared.to_look_up)):
            if found is None:
                unavailable += 1
            else:
                refs.append(found)
        read = await read_files(
            refs,
            self._fetch,
            max_bytes=self.settings.attachment_max_bytes,
            seconds_each=self.settings.attachment_timeout_seconds,
            where=f"Slack channel {channel}",
        )
        if not unavailable:
            return read
        return ReadFiles(read.files, (*read.notes, unavailable_note(unavailable)))

    async def _file_info(self, file_id: str) -> FileRef | None:
        """A file's details from files.info (Slack Connect leaves them out of events)."""
        try:
            response = await asyncio.wait_for(
                self.app.client.files_info(file=file_id),
                self.settings.attachment_timeout_seconds,
            )
        except Exception as exc:  # refused, timed out, the network: noted, not fatal
            log.warning("Slack files.info failed for a shared file: %s", type(exc).__name__)
            return None
        file = response.get("file")
        return file_ref(file) if isinstance(file, Mapping) else None

    async def _fetch(self, ref: FileRef, limit: int) -> bytes:
        """Download a file with the bot token: at most `limit` + 1 bytes."""
        if not is_slack_file_url(ref.url, self._api_base):
            # The token goes to Slack only, whatever URL an event names.
            raise DownloadError("not a Slack file URL")
        if self._downloads is None:
            self._downloads = aiohttp.ClientSession()
        token = self.app.client.token or ""
        headers = {"Authorization": f"Bearer {token}"}
        async with self._downloads.get(ref.url, headers=headers) as response:
            if not 200 <= response.status < 300:
                raise DownloadError("refused", response.status)
            if response.content_type == "text/html" and not _is_html(ref):
                # Slack's answer without files:read: its sign-in page, with a 200.
                if not self._warned_sign_in:
                    self._warned_sign_in = True
                    log.warning(
                        "Slack answered a file download with a web page: the app needs "
                        "the files:read scope (add it, then reinstall the app)"
                    )
                raise DownloadError("a web page instead of the file")
            data = bytearray()
            while len(data) <= limit:
                chunk = await response.content.read(limit + 1 - len(data))
                if not chunk:
                    break
                data += chunk
            return bytes(data)

    async def _set_status(self, set_status: Any, status: str) -> None:
        try:
            await set_status(status)
        except SlackApiError as exc:
            log.warning("Slack refused an assistant status: %s", exc.response.get("error"))

    async def _stream(
        self, channel: str, thread: str | None, message: Message, user: str, team: str
    ) -> bool:
        """Write the reply to `message`; True if anything was posted."""
        stream = self.engine.stream(message)
        reply = self._growing_reply(channel, thread)
        native: list[object] = []
        try:
            if self.native_streaming and thread is not None:
                await self._stream_natively(stream, channel, thread, user, team, native)
            else:
                await play(stream, reply)
        except SlackApiError as exc:
            log.warning(
                "Slack refused a reply in channel %s: %s",
                channel,
                exc.response.get("error", exc.response.status_code),
            )
            await stream.aclose()
            # What was posted stays, followed by a note saying it was cut short.
            return await self._post_text(channel, thread, UNFINISHED) or bool(
                reply.posted or native
            )
        return bool(reply.posted or native)

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

        async def retract(ts: str) -> object:
            return await client.chat_delete(channel=channel, ts=ts)

        return GrowingReply(reply_parts, post, edit, self.pacer, lambda ts: ts, retract=retract)

    async def _stream_natively(
        self,
        stream: ReplyStream,
        channel: str,
        thread: str,
        user: str,
        team: str,
        started: list[object],
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
                failed = stream.reply is not None and not stream.reply.ok
                if failed and streamer is not None and not chunk.startswith("\n"):
                    # Streamed text cannot be taken back: keep it, and set the apology
                    # apart so that it reads as the note that the answer was cut off.
                    chunk = "\n\n" + chunk
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
                    started.append(streamer)
                    streamed = 0
                await streamer.append(markdown_text=escape(chunk))
                streamed += len(chunk)
        finally:
            await stream.aclose()
        if streamer is not None:
            await streamer.stop()

    async def _post_text(self, channel: str, thread: str | None, text: str) -> bool:
        """Post a short message; True if Slack took it (a refusal is logged)."""
        try:
            await self.app.client.chat_postMessage(channel=channel, thread_ts=thread, text=text)
        except SlackApiError as exc:
            log.warning(
                "Slack refused a message in channel %s: %s",
                channel,
                exc.response.get("error", exc.response.status_code),
            )
            return False
        return True

    # --- slash commands ---------------------------------------------------------------------
    # Each one acks first (Slack wants it within 3 s), before anything that can wait on
    # the engine, Redis or the Web API. Command text arrives HTML-escaped: read through
    # `command_text`, escaped once on the way out.

    async def _is_own_dm(self, command: Mapping[str, Any]) -> bool:
        """Whether a command typed in a 1:1 DM was typed in the DM with the bot: a DM
        between two people is a DM too, and the bot can neither read nor post there."""
        if command_place(command) != "dm":
            return False
        try:
            info = await self.app.client.conversations_info(
                channel=str(command.get("channel_id", ""))
            )
        except SlackApiError:
            return False  # channel_not_found: someone else's DM
        channel = info.get("channel") or {}
        return bool(channel.get("is_im")) and channel.get("user") == command.get("user_id")

    def _command_allowed(self, command: Mapping[str, Any], own_dm: bool) -> bool:
        return self._inflight.accepting and self.rules.allows(
            user=str(command.get("user_id", "")),
            channel=str(command.get("channel_id", "")),
            is_direct=own_dm,
        )

    async def on_ask(
        self, ack: Any, command: dict[str, Any], respond: Any, body: dict[str, Any]
    ) -> None:
        await ack()  # within Slack's 3 s, before any generation
        user = str(command.get("user_id", ""))
        channel = str(command.get("channel_id", ""))
        question = command_text(command)
        own_dm = await self._is_own_dm(command)
        if not self._command_allowed(command, own_dm):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        if command_place(command) == "dm" and not own_dm:
            await respond(text=CANNOT_POST["dm"], response_type="ephemeral")
            return
        if not question:
            await respond(text=escape(HELP_TEXT), response_type="ephemeral")
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
            place = command_place(command)
            await respond(text=CANNOT_POST[place], response_type="ephemeral")
            return
        thread = str(root["ts"])
        names = await self.names.of([user])
        message = Message(
            conversation=ConversationKey(PLATFORM, channel, thread),
            author_id=user,
            author_name=names.get(user) or NEUTRAL_NAME,
            text=question,
            message_id=thread,
            is_direct=own_dm,
        )
        await self._inflight.track(
            self._stream(channel, thread, message, user, str(body.get("team_id") or ""))
        )

    async def on_persona(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()
        if not self._command_allowed(command, await self._is_own_dm(command)):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        parsed = personas.parse(command_text(command))
        if parsed is None:
            await respond(text=escape(personas.USAGE), response_type="ephemeral")
            return
        action, text = parsed
        if action != "show" and str(command.get("user_id")) not in self.settings.slack_admins:
            await respond(
                text="Only the admins in SLACK_ADMINS can change the persona.",
                response_type="ephemeral",
            )
            return
        key = ConversationKey(PLATFORM, str(command.get("channel_id", "")))
        try:
            answer = await personas.run(self.engine, key, action, text)
        except Exception:
            log.exception("/persona failed in channel %s", key.channel)
            answer = COMMAND_FAILED
        await respond(text=escape(answer), response_type="ephemeral")

    async def on_forget(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        """Forget everything the person told the bot, in every Slack conversation.

        Not subject to the allow-lists, and typed anywhere (a channel, a DM, someone
        else's DM): someone no longer allowed may still have their data deleted, and
        it touches only theirs.
        """
        await ack()
        if not self._inflight.accepting:
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        user = str(command.get("user_id", ""))
        try:
            answer = forgetting.describe(await self.engine.forget_user(PLATFORM, user))
        except Exception:
            log.exception("/forget failed in channel %s", command.get("channel_id"))
            answer = COMMAND_FAILED
        await respond(text=answer, response_type="ephemeral")

    async def on_reset(self, ack: Any, command: dict[str, Any], respond: Any) -> None:
        await ack()
        channel = str(command.get("channel_id", ""))
        own_dm = await self._is_own_dm(command)
        if not self._command_allowed(command, own_dm):
            await respond(text=REFUSAL, response_type="ephemeral")
            return
        if own_dm:
            try:
                await self.engine.reset(ConversationKey(PLATFORM, channel))
                answer = "Done: I've forgotten our conversation."
            except Exception:
                log.exception("/reset failed in channel %s", channel)
                answer = COMMAND_FAILED
        elif command_place(command) == "dm":
            answer = CANNOT_POST["dm"]
        else:
            answer = (
                "In channels each thread is its own conversation: start a new thread "
                "to start afresh."
            )
        await respond(text=answer, response_type="ephemeral")

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


def _is_html(ref: FileRef) -> bool:
    return ref.content_type.startswith("text/html") or ref.name.lower().endswith((".html", ".htm"))
