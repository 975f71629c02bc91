"""Discord messages in: which are answered (mentions, DMs, the bot's threads), their
attachments read, "is typing…" shown, and the reply streamed by edits (with its
buttons: `adapters.discord.controls`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import discord

from adapters.bounded import RecentSet
from adapters.discord.controls import ReplyControls
from adapters.discord.translate import (
    HELP_LINE,
    PLATFORM,
    Trigger,
    conversation_key,
    file_refs,
    to_message,
    trigger,
)
from adapters.downloads import download
from bot.attachments import FileRef, ImageLimits, read_files
from bot.messages import Message
from bot.ratelimit import Verdict, rate_limit_note
from bot.streaming import EditPacer

log = logging.getLogger(__name__)

# Threads known to be the bot's (and, for a while, known not to be): bounded, so a
# server with many threads cannot grow them without end; a forgotten one is looked
# up again in memory.
KNOWN_THREADS = 10_000
NOT_OURS_SECONDS = 600.0


class MessageEvents(ReplyControls):
    """`on_message` and the reply it streams."""

    pacer: EditPacer
    typing_interval: float
    attachment_max_bytes: int
    attachment_seconds: float
    image_limits: ImageLimits
    _threads: RecentSet[int]
    _not_ours: RecentSet[int]
    _downloads: aiohttp.ClientSession | None  # attachments' downloads

    async def on_message(self, message: discord.Message) -> None:
        if not self._inflight.accepting or self._engine is None:
            return
        me = self.identity(message.guild)
        why = trigger(message, me, self.rules, self._threads)
        channel = message.channel
        if (
            why is None
            and isinstance(channel, discord.Thread)
            and trigger(message, me, self.rules, {channel.id}) is Trigger.THREAD
            and self._allowed(message.author, message.guild, channel)
            and await self._recall_thread(channel)
        ):
            # A follow-up in a thread this process does not know (a restart, or
            # forgotten): looked up in memory only for a message it may answer.
            why = Trigger.THREAD
        if why is None:
            return
        if not self._allowed(message.author, message.guild, message.channel):
            log.debug("Ignoring %s from %s: not allowed here", why, message.author.id)
            return
        verdict = self.limiter.check(str(message.author.id))
        if verdict is not Verdict.ALLOW:
            if verdict is Verdict.NOTIFY:
                note = rate_limit_note(self.limiter.retry_after(str(message.author.id)))
                await self._safely(message.channel, self._reply_text(message, note))
            return
        incoming = to_message(message, me)
        if not incoming.text and not message.attachments:
            await self._safely(message.channel, self._reply_text(message, HELP_LINE))
            return
        if isinstance(message.channel, discord.Thread):
            self._threads.add(message.channel.id)
            self._not_ours.discard(message.channel.id)
        await self._inflight.track(self._answer(message, incoming))

    async def _recall_thread(self, thread: discord.Thread) -> bool:
        """Whether the bot answered in `thread` before, by its memory (in Redis, it
        survives a restart). A "no" is remembered for a while; a read that failed
        (memory unreachable) is not, so the thread is looked up again next time."""
        if thread.id in self._not_ours:
            return False
        if await self.engine.memory.history(conversation_key(thread)):
            self._threads.add(thread.id)
            return True
        if await self.engine.memory.ready():  # an empty history, not an outage
            self._not_ours.add(thread.id)
        return False

    async def _with_files(self, origin: discord.Message, incoming: Message) -> Message:
        """`incoming` with `origin`'s text attachments read (and its images, for a
        model that takes them), and notes for the others.

        A file declared over the cap is skipped before any download; one that lied
        about its size is read up to the cap and skipped. Downloads follow no redirect
        (Discord's CDN serves attachments directly): a redirect is a failed download.
        """
        refs = file_refs(origin)
        if not refs:
            return incoming

        if self._downloads is None:  # one session for every download, made at the first
            self._downloads = aiohttp.ClientSession()
        session = self._downloads

        async def fetch(ref: FileRef, limit: int) -> bytes:
            return (await download(session, ref.url, limit)).data

        read = await read_files(
            refs,
            fetch,
            max_bytes=self.attachment_max_bytes,
            seconds_each=self.attachment_seconds,
            where=f"channel {origin.channel.id}",
            images=self.image_limits if self.engine.takes_images else None,
        )
        return dataclasses.replace(
            incoming,
            files=read.files,
            notes=read.notes,
            images=read.images,
            image_names=read.image_names,
        )

    async def _answer(self, origin: discord.Message, incoming: Message) -> None:
        """Read the attachments, then stream the reply: the first part replies to
        `origin` (with Stop under it), the rest follow it."""
        typing = not await self._silenced(incoming)
        async with self._typing(origin.channel, typing) as stop_typing:
            incoming = await self._with_files(origin, incoming)
            stop = self.stop_view(incoming.conversation, incoming.message_id)

            async def first(part: str) -> discord.Message:
                # Posting clears "is typing…"; typing again would show it for
                # another ~10 s while the reply is only being edited.
                await stop_typing()
                return await self._reply_to(origin, part, stop)

            stream = self.engine.stream(incoming)
            reply = self._growing(origin.channel, first)
            work = self._play(stream, reply, incoming.conversation, incoming.message_id)
            await self._safely(origin.channel, work)

    async def _silenced(self, incoming: Message) -> bool:
        """Whether the person has spent today's allowance: the engine answers with a
        note at once (no "is typing…" needed), or with silence (none may show)."""
        if not self.engine.daily_tokens:
            return False
        try:
            return (await self.engine.usage(PLATFORM, incoming.author_id)).exhausted
        except Exception:  # the store away: the engine answers (it cannot count either)
            return False

    @contextlib.asynccontextmanager
    async def _typing(
        self, channel: discord.abc.Messageable, show: bool = True
    ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """ "is typing…" (if `show`) until the function it yields is called (or the
        block ends); best effort: a refused typing call changes nothing else."""

        async def trigger_typing() -> None:
            with contextlib.suppress(discord.HTTPException):
                await channel.typing()  # awaited, not entered: one indicator, no loop

        async def keep_typing() -> None:
            while True:
                await asyncio.sleep(self.typing_interval)
                await trigger_typing()

        task: asyncio.Task[None] | None = None
        if show:
            await trigger_typing()
            task = asyncio.create_task(keep_typing())

        async def stop() -> None:
            if task is None:
                return
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        try:
            yield stop
        finally:
            await stop()
