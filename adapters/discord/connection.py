"""The Discord connection: discord.py events in, engine replies out.

Decisions (who is answered, in which conversation, how a reply is cut into
messages) live in `adapters.discord.translate`; this module does the I/O: the
gateway, downloading attachments, typing, posting and editing replies as they
stream, slash commands, and a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import discord
from discord import app_commands

from adapters.bounded import RecentSet
from adapters.discord.translate import (
    HELP_LINE,
    NO_MENTIONS,
    PLATFORM,
    REFUSAL,
    Identity,
    Rules,
    Trigger,
    conversation_key,
    file_refs,
    interaction_names,
    invite_url,
    member_role_ids,
    place_ids,
    readable_mentions,
    reply_parts,
    strip_mentions,
    to_message,
    trigger,
)
from bot import forgetting, personas
from bot.attachments import FileRef, read_files
from bot.engine import COMMAND_FAILED, Engine
from bot.inflight import InFlight
from bot.messages import Message
from bot.ratelimit import RateLimiter, Verdict, rate_limit_note
from bot.settings import ConfigError, Settings
from bot.streaming import EditPacer, GrowingReply, play

log = logging.getLogger(__name__)

# Threads known to be the bot's (and, for a while, known not to be): bounded, so a
# server with many threads cannot grow them without end; a forgotten one is looked
# up again in memory.
KNOWN_THREADS = 10_000
NOT_OURS_SECONDS = 600.0


class DiscordAdapter:
    """Runs the bot on Discord until `stop` is set."""

    name = PLATFORM

    def __init__(
        self, settings: Settings, *, edit_interval: float = 1.0, typing_interval: float = 5.0
    ) -> None:
        if settings.discord_token is None:
            raise ConfigError("DISCORD_TOKEN is not set")
        self._token = settings.discord_token.get_secret_value()
        self.rules = Rules.from_settings(settings)
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.pacer = EditPacer(edit_interval)
        self.typing_interval = typing_interval  # Discord shows "is typing…" for ~10 s
        self.attachment_max_bytes = settings.attachment_max_bytes
        self.attachment_seconds = settings.attachment_timeout_seconds
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the Developer Portal
        if settings.discord_shard_count:
            # Large bots: this process runs some (or all) of the configured shards.
            # No ids: this process runs every shard.
            ids = sorted(int(i) for i in settings.discord_shard_ids) or list(
                range(settings.discord_shard_count)
            )
            self.client: discord.Client = discord.AutoShardedClient(
                intents=intents,
                allowed_mentions=NO_MENTIONS,
                chunk_guilds_at_startup=False,
                shard_count=settings.discord_shard_count,
                shard_ids=ids,
            )
        else:
            self.client = discord.Client(
                intents=intents,
                allowed_mentions=NO_MENTIONS,
                chunk_guilds_at_startup=False,
            )
        self.tree = app_commands.CommandTree(self.client)
        self.ready = asyncio.Event()
        self._engine: Engine | None = None
        self._inflight = InFlight("Discord", settings.shutdown_grace_seconds)
        self._threads: RecentSet[int] = RecentSet(KNOWN_THREADS)  # the bot answered there
        self._not_ours: RecentSet[int] = RecentSet(KNOWN_THREADS, NOT_OURS_SECONDS)
        self._register()

    # --- identity and access ---------------------------------------------------------

    def identity(self, guild: discord.Guild | None) -> Identity:
        user = self.client.user
        assert user is not None, "not logged in"
        roles = frozenset(
            role.id
            for role in (guild.roles if guild else [])
            if role.tags is not None and role.tags.bot_id == user.id
        )
        return Identity(user.id, roles)

    def _allowed(
        self, author: discord.User | discord.Member, guild: discord.Guild | None, channel: object
    ) -> bool:
        return self.rules.allows(
            user_id=author.id,
            role_ids=member_role_ids(author),
            guild_id=guild.id if guild else None,
            channel_ids=place_ids(channel),
        )

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "run() first"
        return self._engine

    # --- events ---------------------------------------------------------------------

    def _register(self) -> None:
        self.client.event(self.setup_hook)
        self.client.event(self.on_ready)
        self.client.event(self.on_message)
        self._add_commands()

    async def setup_hook(self) -> None:
        try:
            if self.rules.guilds:
                for guild_id in sorted(self.rules.guilds):
                    guild = discord.Object(int(guild_id))
                    self.tree.copy_global_to(guild=guild)
                    await self.tree.sync(guild=guild)
                log.info("Slash commands synced to guilds %s", ", ".join(sorted(self.rules.guilds)))
            else:
                await self.tree.sync()
                log.info("Slash commands synced globally (they can take a while to appear)")
        except discord.HTTPException as exc:
            log.warning("Could not sync slash commands: %s %s", exc.status, exc.text)

    async def on_ready(self) -> None:
        if self.ready.is_set():
            return  # a reconnect
        assert self.client.user is not None
        app_id = self.client.application_id or self.client.user.id
        log.info("Discord: logged in as %s (%s)", self.client.user, self.client.user.id)
        log.info("Discord: invite the bot with %s", invite_url(app_id))
        self.ready.set()

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
        """`incoming` with `origin`'s text attachments read, and notes for the others.

        `Attachment.read` downloads the whole file; a file declared over the cap is
        skipped before any download, so only one that lied about its size is read past it.
        """
        refs = file_refs(origin)
        if not refs:
            return incoming
        by_url = {attachment.url: attachment for attachment in origin.attachments}

        async def fetch(ref: FileRef, limit: int) -> bytes:
            return (await by_url[ref.url].read())[: limit + 1]

        read = await read_files(
            refs,
            fetch,
            max_bytes=self.attachment_max_bytes,
            seconds_each=self.attachment_seconds,
            where=f"channel {origin.channel.id}",
        )
        return dataclasses.replace(incoming, files=read.files, notes=read.notes)

    async def _answer(self, origin: discord.Message, incoming: Message) -> None:
        """Read the attachments, then stream the reply: the first part replies to
        `origin`, the rest follow it."""

        async with self._typing(origin.channel) as stop_typing:
            incoming = await self._with_files(origin, incoming)

            async def post(index: int, part: str) -> discord.Message:
                if index == 0:
                    # Posting clears "is typing…"; typing again would show it for
                    # another ~10 s while the reply is only being edited.
                    await stop_typing()
                    return await self._reply_to(origin, part)
                return await origin.channel.send(part, allowed_mentions=NO_MENTIONS)

            async def edit(message: discord.Message, part: str) -> object:
                return await message.edit(content=part, allowed_mentions=NO_MENTIONS)

            async def retract(message: discord.Message) -> object:
                with contextlib.suppress(discord.NotFound):
                    await message.delete()
                return None

            # Paced per channel: Discord rate-limits edits per channel, and one global
            # timer would slow every channel down to the busiest one.
            reply = GrowingReply(
                reply_parts, post, edit, self.pacer, lambda m: m.channel.id, retract=retract
            )
            await self._safely(origin.channel, play(self.engine.stream(incoming), reply))

    async def _reply_to(self, origin: discord.Message, text: str) -> discord.Message:
        """Post `text` as a reply to `origin`; if `origin` was deleted meanwhile (by its
        author, by AutoMod), as a plain message instead of failing."""
        return await origin.channel.send(
            text,
            reference=origin.to_reference(fail_if_not_exists=False),
            mention_author=False,
            allowed_mentions=NO_MENTIONS,
        )

    async def _reply_text(self, origin: discord.Message, text: str) -> None:
        await self._reply_to(origin, text)

    async def _safely(self, channel: object, action: Awaitable[object]) -> None:
        """Await `action`; a Discord HTTP error is logged with the channel, not raised."""
        try:
            await action
        except discord.HTTPException as exc:
            log.warning(
                "Discord refused a message in channel %s: HTTP %s %s",
                getattr(channel, "id", "?"),
                exc.status,
                exc.text or "",
            )

    @contextlib.asynccontextmanager
    async def _typing(
        self, channel: discord.abc.Messageable
    ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """ "is typing…" until the function it yields is called (or the block ends);
        best effort: a refused typing call changes nothing else."""

        async def trigger_typing() -> None:
            with contextlib.suppress(discord.HTTPException):
                await channel.typing()  # awaited, not entered: one indicator, no loop

        async def keep_typing() -> None:
            while True:
                await asyncio.sleep(self.typing_interval)
                await trigger_typing()

        await trigger_typing()
        task = asyncio.create_task(keep_typing())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        try:
            yield stop
        finally:
            await stop()

    # --- slash commands ---------------------------------------------------------------

    def _add_commands(self) -> None:
        @self.tree.command(name="ask", description="Ask the bot something in this channel")
        @app_commands.describe(prompt="Your question or request")
        async def ask(interaction: discord.Interaction, prompt: str) -> None:
            await self.slash_ask(interaction, prompt)

        @self.tree.command(name="reset", description="Forget this channel's conversation")
        async def reset(interaction: discord.Interaction) -> None:
            await self.slash_reset(interaction)

        @self.tree.command(name="forget", description=forgetting.COMMAND_HELP)
        async def forget(interaction: discord.Interaction) -> None:
            await self.slash_forget(interaction)

        @self.tree.command(name="help", description="How to talk to the bot")
        async def help_(interaction: discord.Interaction) -> None:
            await interaction.response.send_message(HELP_LINE, ephemeral=True)

        persona = app_commands.Group(name="persona", description="This channel's persona")

        @persona.command(name="set", description="Give this channel its own system prompt")
        @app_commands.describe(text="How the bot should behave here")
        async def persona_set(interaction: discord.Interaction, text: str) -> None:
            await self.slash_persona(interaction, "set", text)

        @persona.command(name="show", description="Show this channel's persona")
        async def persona_show(interaction: discord.Interaction) -> None:
            await self.slash_persona(interaction, "show", "")

        @persona.command(name="clear", description="Go back to the default persona")
        async def persona_clear(interaction: discord.Interaction) -> None:
            await self.slash_persona(interaction, "clear", "")

        self.tree.add_command(persona)

    async def _refused(self, interaction: discord.Interaction) -> bool:
        """Whether the command is refused here (not allowed, or the bot is stopping);
        the person is told so privately."""
        allowed = self._inflight.accepting and self._allowed(
            interaction.user, interaction.guild, interaction.channel
        )
        if not allowed:
            await interaction.response.send_message(REFUSAL, ephemeral=True)
        return not allowed

    async def slash_ask(self, interaction: discord.Interaction, prompt: str) -> None:
        if await self._refused(interaction):
            return
        user = str(interaction.user.id)
        if self.limiter.check(user) is not Verdict.ALLOW:
            note = rate_limit_note(self.limiter.retry_after(user))
            await interaction.response.send_message(note, ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        text = strip_mentions(prompt, self.identity(interaction.guild))
        incoming = Message(
            conversation=conversation_key(interaction.channel),
            author_id=user,
            author_name=interaction.user.display_name,
            text=readable_mentions(text, interaction_names(interaction, text)),
            message_id=str(interaction.id),
            timestamp=interaction.created_at,
            is_direct=interaction.guild is None,
        )

        async def answer() -> None:
            reply = await self.engine.reply(incoming)
            first, *rest = reply_parts(reply.text)
            await interaction.edit_original_response(content=first, allowed_mentions=NO_MENTIONS)
            for part in rest:
                await interaction.followup.send(part, allowed_mentions=NO_MENTIONS)

        await self._inflight.track(self._safely(interaction.channel, answer()))

    async def slash_persona(
        self, interaction: discord.Interaction, action: personas.Action, text: str
    ) -> None:
        if await self._refused(interaction):
            return
        in_guild = interaction.guild is not None
        if action != "show" and in_guild and not interaction.permissions.manage_channels:
            await interaction.response.send_message(personas.NOT_ALLOWED, ephemeral=True)
            return
        key = conversation_key(interaction.channel)
        await self._after_defer(interaction, lambda: personas.run(self.engine, key, action, text))

    async def slash_reset(self, interaction: discord.Interaction) -> None:
        if await self._refused(interaction):
            return

        async def reset() -> str:
            await self.engine.reset(conversation_key(interaction.channel))
            return "Done: I've forgotten this channel's conversation."

        await self._after_defer(interaction, reset)

    async def slash_forget(self, interaction: discord.Interaction) -> None:
        """Delete what the person told the bot, in every conversation on Discord.

        Not subject to the allow-lists: someone no longer allowed (a role taken away, a
        channel closed) may still have their data deleted, and it touches only theirs.
        """
        if not self._inflight.accepting:
            await interaction.response.send_message(REFUSAL, ephemeral=True)
            return
        user = str(interaction.user.id)

        async def forget() -> str:
            return forgetting.describe(await self.engine.forget_user(PLATFORM, user))

        await self._after_defer(interaction, forget)

    async def _after_defer(
        self, interaction: discord.Interaction, work: Callable[[], Awaitable[str]]
    ) -> None:
        """Acknowledge at once (privately), then do `work` and show what it returns.

        `work` may wait on the engine (a reply being written in the same conversation)
        or on Redis; Discord wants an answer to the interaction within 3 s.
        """
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            answer = await work()
        except Exception:
            name = interaction.command.name if interaction.command else "command"
            log.exception("/%s failed in channel %s", name, interaction.channel_id)
            answer = COMMAND_FAILED
        await self._safely(
            interaction.channel,
            interaction.edit_original_response(content=answer, allowed_mentions=NO_MENTIONS),
        )

    # --- running ------------------------------------------------------------------------

    async def run(self, engine: Engine, stop: asyncio.Event) -> None:
        self._engine = engine
        async with self.client:
            connection = asyncio.create_task(self.client.start(self._token))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([connection, stopping], return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                stopping.cancel()
                self._raise_start_error(connection)
                return
            await self._inflight.drain()
            await self.client.close()
            with contextlib.suppress(asyncio.CancelledError):
                await connection

    @staticmethod
    def _raise_start_error(connection: asyncio.Task[None]) -> None:
        error = connection.exception()
        if isinstance(error, discord.LoginFailure):
            raise ConfigError("Discord refused DISCORD_TOKEN: check the bot token") from None
        if isinstance(error, discord.PrivilegedIntentsRequired):
            raise ConfigError(
                "Discord: enable the Message Content intent for this bot in the Developer "
                "Portal (Bot > Privileged Gateway Intents)"
            ) from None
        if isinstance(error, aiohttp.ClientError | OSError):
            raise ConnectionError(f"Cannot connect to Discord: {error}") from None
        if error is not None:
            raise error
