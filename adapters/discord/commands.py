"""Discord slash commands: /ask, /reset, /forget, /usage, /help and /persona, each answered
within Discord's 3 s (deferred first where the work may wait)."""

from __future__ import annotations

import logging

import discord
from discord import app_commands

from adapters.discord.context import DiscordContext
from adapters.discord.translate import (
    HELP_LINE,
    NO_MENTIONS,
    PLATFORM,
    REFUSAL,
    conversation_key,
    interaction_names,
    readable_mentions,
    reply_parts,
    strip_mentions,
)
from bot import forgetting, personas
from bot.messages import Message
from bot.ratelimit import Verdict, rate_limit_note
from bot.usage import describe_usage

log = logging.getLogger(__name__)


class SlashCommands(DiscordContext):
    """The application commands, registered on `tree`."""

    tree: app_commands.CommandTree[discord.Client]

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

        @self.tree.command(name="usage", description="Your use of the bot today, and your limit")
        async def usage(interaction: discord.Interaction) -> None:
            await self.slash_usage(interaction)

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

    async def slash_usage(self, interaction: discord.Interaction) -> None:
        """The person's own use today and their limit, privately."""
        if await self._refused(interaction):
            return
        user = str(interaction.user.id)

        async def usage() -> str:
            return describe_usage(await self.engine.usage(PLATFORM, user))

        await self._after_defer(interaction, usage)
