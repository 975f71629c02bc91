"""The Discord connection: discord.py events in, engine replies out.

Decisions (who is answered, in which conversation, how a reply is cut into
messages) live in `adapters.discord.translate`; the I/O is split by concern:
this module's connection and lifecycle (the client, its shards, the gateway, a
graceful stop), `events` (messages, attachments, typing, streamed replies),
`commands` (slash commands) and `context` (what they share).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
import discord
from discord import app_commands

from adapters.bounded import RecentSet
from adapters.discord.commands import SlashCommands
from adapters.discord.events import KNOWN_THREADS, NOT_OURS_SECONDS, MessageEvents
from adapters.discord.translate import NO_MENTIONS, PLATFORM, Rules, invite_url
from bot.attachments import ImageLimits
from bot.engine import Engine
from bot.inflight import InFlight
from bot.ratelimit import RateLimiter
from bot.settings import ConfigError, Settings
from bot.streaming import EditPacer

log = logging.getLogger(__name__)


class DiscordAdapter(MessageEvents, SlashCommands):
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
        self.image_limits = ImageLimits.of(settings)
        self._downloads: aiohttp.ClientSession | None = None  # at the first download
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
        self._init_controls()
        self._register()

    # --- connection ---------------------------------------------------------------------

    def _register(self) -> None:
        self.client.event(self.setup_hook)
        self.client.event(self.on_ready)
        self.client.event(self.on_message)
        self._add_commands()

    async def setup_hook(self) -> None:
        # The buttons of replies posted before a restart are handled too.
        self.client.add_dynamic_items(self._button)
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
            if self._downloads is not None:
                await self._downloads.close()
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
