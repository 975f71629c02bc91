"""What the Discord adapter's handlers share: the client, the access rules, the
engine, posting so that a refusal from Discord is logged, never raised, and the
private answers to interactions (slash commands, buttons)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord

from adapters.discord.translate import (
    NO_MENTIONS,
    REFUSAL,
    Identity,
    Rules,
    member_role_ids,
    place_ids,
)
from bot.engine import COMMAND_FAILED, Engine
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

    async def _reply_to(
        self, origin: discord.Message, text: str, view: discord.ui.View | None = None
    ) -> discord.Message:
        """Post `text` (with `view`'s buttons) as a reply to `origin`; if `origin` was
        deleted meanwhile (by its author, by AutoMod), as a plain message instead of
        failing."""
        return await origin.channel.send(
            text,
            reference=origin.to_reference(fail_if_not_exists=False),
            mention_author=False,
            allowed_mentions=NO_MENTIONS,
            view=view or discord.utils.MISSING,
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

    async def _refused(self, interaction: discord.Interaction) -> bool:
        """Whether the interaction (a slash command, a button) is refused here (not
        allowed, or the bot is stopping); the person is told so privately."""
        allowed = self._inflight.accepting and self._allowed(
            interaction.user, interaction.guild, interaction.channel
        )
        if not allowed:
            await interaction.response.send_message(REFUSAL, ephemeral=True)
        return not allowed

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
            what = f"/{interaction.command.name}" if interaction.command else "A button"
            log.exception("%s failed in channel %s", what, interaction.channel_id)
            answer = COMMAND_FAILED
        await self._safely(
            interaction.channel,
            interaction.edit_original_response(content=answer, allowed_mentions=NO_MENTIONS),
        )
