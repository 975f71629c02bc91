"""What the Discord adapter's handlers share: the client, the access rules, the
engine, and posting so that a refusal from Discord is logged, never raised."""

from __future__ import annotations

import logging
from collections.abc import Awaitable

import discord

from adapters.discord.translate import (
    NO_MENTIONS,
    Identity,
    Rules,
    member_role_ids,
    place_ids,
)
from bot.engine import Engine
from bot.inflight import InFlight
from bot.ratelimit import RateLimiter

log = logging.getLogger(__name__)


class DiscordContext:
    """The state `DiscordAdapter.__init__` sets up, and the handlers' common calls."""

    client: discord.Client
    rules: Rules
    limiter: RateLimiter
    _engine: Engine | None
    _inflight: InFlight

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
