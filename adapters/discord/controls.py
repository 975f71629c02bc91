"""The buttons under a Discord reply: Stop while it is written; Regenerate, 👍 and
👎 once it has ended (`adapters.discord.buttons` says which, and their custom_ids).

The buttons are `discord.ui.DynamicItem`s registered with the client: a press is
handled from its custom_id alone, so buttons posted before a restart still answer.
Every press goes through the same access checks as messages and slash commands, is
acknowledged at once (Discord wants an answer within 3 s), and anything said to the
person who pressed is said privately (ephemeral).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import discord

from adapters.bounded import RecentMap
from adapters.discord.buttons import (
    ENDED,
    NOT_YOURS_TO_STOP,
    TEMPLATE,
    THANKS,
    UNCHANGED,
    Action,
    ButtonRef,
    ButtonSpec,
    ended_buttons,
    may_stop,
    parse,
    streaming_buttons,
    verdict,
)
from adapters.discord.context import DiscordContext
from adapters.discord.translate import NO_MENTIONS, PLATFORM, reply_parts
from bot.engine import ReplyStream
from bot.messages import ConversationKey
from bot.ratelimit import Verdict, rate_limit_note
from bot.streaming import EditPacer, GrowingReply, play

log = logging.getLogger(__name__)

# Replies whose messages this process posted, by their first message's id: what a
# Regenerate edits (after a restart: the first and the last message, from the press).
KNOWN_REPLIES = 2_000
MAX_PARTS = 20  # looked up after a restart between a reply's first and last message

Handle = discord.PartialMessage  # a posted message (discord.Message is one too)
Pressed = Callable[[discord.Interaction, ButtonRef], Awaitable[None]]
_STYLES = {
    "danger": discord.ButtonStyle.danger,
    "primary": discord.ButtonStyle.primary,
    "secondary": discord.ButtonStyle.secondary,
}


@dataclass
class _Posted:
    """A reply's messages, and what each says now."""

    messages: list[Handle]
    texts: list[str]


def button_type(pressed: Pressed) -> type[discord.ui.DynamicItem[discord.ui.Button[Any]]]:
    """The DynamicItem class for the bot's buttons, handing every press to `pressed`."""

    class ReplyButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=TEMPLATE):
        @classmethod
        async def from_custom_id(
            cls,
            interaction: discord.Interaction[discord.Client],
            item: discord.ui.Item[Any],
            match: re.Match[str],
            /,
        ) -> ReplyButton:
            return cls(discord.ui.Button(custom_id=match.string))

        async def callback(self, interaction: discord.Interaction[discord.Client]) -> None:
            ref = parse(self.custom_id, PLATFORM)
            if ref is not None:
                await pressed(interaction, ref)

    return ReplyButton


class ReplyControls(DiscordContext):
    """The buttons on replies: shown while a reply streams and once it ends, and
    what a press does."""

    pacer: EditPacer
    _button: type[discord.ui.DynamicItem[discord.ui.Button[Any]]]
    _posted: RecentMap[str, _Posted]

    def _init_controls(self) -> None:
        self._button = button_type(self._pressed)
        self._posted = RecentMap(KNOWN_REPLIES)

    def _view(self, specs: tuple[ButtonSpec, ...]) -> discord.ui.View:
        # No timeout: a view that timed out would unregister the buttons' template.
        view = discord.ui.View(timeout=None)
        for spec in specs:
            button: discord.ui.Button[Any] = discord.ui.Button(
                style=_STYLES[spec.style],
                label=spec.label,
                emoji=spec.emoji,
                custom_id=spec.custom_id,
            )
            view.add_item(self._button(button))
        return view

    def stop_view(self, conversation: ConversationKey, message_id: str) -> discord.ui.View:
        return self._view(streaming_buttons(conversation, message_id))

    # --- a reply shown, with its buttons --------------------------------------------

    def _growing(
        self,
        channel: discord.abc.Messageable,
        first: Callable[[str], Awaitable[Handle]] | None = None,
        views: dict[int, discord.ui.View | None] | None = None,
    ) -> GrowingReply[Handle]:
        """The messages that show a reply: `first` posts the first part (else it is
        sent to `channel`, as the others are); `views`: buttons to set on a message
        with its next edit (None: none). (A silent or refused reply is never shown:
        `bot.streaming.play`.)"""
        pending = views if views is not None else {}

        async def post(index: int, part: str) -> Handle:
            if index == 0 and first is not None:
                return await first(part)
            return await channel.send(part, allowed_mentions=NO_MENTIONS)

        async def edit(message: Handle, part: str) -> object:
            view = pending.pop(message.id, discord.utils.MISSING)
            return await message.edit(content=part, allowed_mentions=NO_MENTIONS, view=view)

        async def retract(message: Handle) -> object:
            with contextlib.suppress(discord.NotFound):
                await message.delete()
            return None

        # Paced per channel: Discord rate-limits edits per channel, and one global
        # timer would slow every channel down to the busiest one.
        return GrowingReply(
            reply_parts, post, edit, self.pacer, lambda m: m.channel.id, retract=retract
        )

    async def _play(
        self,
        stream: ReplyStream,
        growing: GrowingReply[Handle],
        conversation: ConversationKey,
        message_id: str,
    ) -> None:
        """Show `stream`, then swap its buttons: Stop goes; an answer kept in memory
        (stopped or not) gets Regenerate, 👍 and 👎 on its last message."""
        await play(stream, growing)
        outcome = stream.reply
        if outcome is None or outcome.refused or not growing.posted:
            return
        first, last = growing.posted[0], growing.posted[-1]
        reply_id = str(first.id)
        if first.id != last.id:
            await self._set_view(first, None)
        answered = outcome.kept  # an answer in memory (not a note, nor an apology)
        view = self._view(ended_buttons(conversation, message_id, reply_id)) if answered else None
        await self._set_view(last, view)
        if answered:
            self._posted.put(reply_id, _Posted(list(growing.posted), list(growing.shown)))

    async def _set_view(self, message: Handle, view: discord.ui.View | None) -> None:
        key = message.channel.id
        await self.pacer.wait(key)
        self.pacer.mark(key)
        await message.edit(view=view, allowed_mentions=NO_MENTIONS)

    # --- presses ------------------------------------------------------------------

    async def _pressed(self, interaction: discord.Interaction, ref: ButtonRef) -> None:
        where = ref.conversation.thread or ref.conversation.channel
        if str(interaction.channel_id) != where:  # not where the button was posted
            log.warning("Ignoring a button for %s pressed in %s", where, interaction.channel_id)
            return
        if await self._refused(interaction):
            return
        try:
            if ref.action is Action.STOP:
                await self._stop(interaction, ref)
            elif ref.action is Action.REGENERATE:
                await self._regenerate(interaction, ref)
            else:
                await self._after_defer(interaction, lambda: self._feedback(interaction, ref))
        except discord.HTTPException as exc:
            log.warning(
                "Discord refused the answer to a button in channel %s: HTTP %s %s",
                interaction.channel_id,
                exc.status,
                exc.text or "",
            )

    async def _private(self, interaction: discord.Interaction, text: str) -> None:
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)

    async def _stop(self, interaction: discord.Interaction, ref: ButtonRef) -> None:
        live = self.engine.live(ref.conversation, ref.message_id)
        if live is None:
            await self._private(interaction, ENDED)
            return
        manages = interaction.guild is not None and interaction.permissions.manage_messages
        presser = str(interaction.user.id)
        if not may_stop(
            presser_id=presser, asker_id=live.message.author_id, manages_messages=manages
        ):
            await self._private(interaction, NOT_YOURS_TO_STOP)
            return
        if not self.engine.stop(ref.conversation, ref.message_id):
            await self._private(interaction, ENDED)
            return
        log.info("Stop on the reply to %s in %s", ref.message_id, ref.conversation)
        # Acknowledged without a message of its own: the reply's edit shows "(stopped)".
        await interaction.response.defer()

    async def _regenerate(self, interaction: discord.Interaction, ref: ButtonRef) -> None:
        presser = str(interaction.user.id)
        if self.limiter.check(presser) is not Verdict.ALLOW:
            await self._private(interaction, rate_limit_note(self.limiter.retry_after(presser)))
            return
        await interaction.response.defer()  # the answer is the reply's own edits
        pressed_on = interaction.message
        if pressed_on is None:
            return
        stream = self.engine.regenerate(ref.conversation, ref.message_id, presser)
        posted = self._posted.get(ref.reply_id) or await self._after_restart(
            pressed_on, ref.reply_id
        )
        first, last = posted.messages[0], posted.messages[-1]
        # The buttons change with the first edit (none for a refused Regenerate).
        views: dict[int, discord.ui.View | None] = {last.id: None}
        views[first.id] = self.stop_view(ref.conversation, ref.message_id)
        growing = self._growing(pressed_on.channel, views=views)
        growing.posted, growing.shown = list(posted.messages), list(posted.texts)
        work = self._play(stream, growing, ref.conversation, ref.message_id)
        await self._inflight.track(self._safely(pressed_on.channel, work))
        outcome = stream.reply
        if outcome is not None and outcome.refused:
            await interaction.followup.send(
                outcome.text, ephemeral=True, allowed_mentions=NO_MENTIONS
            )

    async def _after_restart(self, pressed_on: discord.Message, reply_id: str) -> _Posted:
        """A reply this process did not post (or has forgotten): its first message,
        the bot's messages after it, and the one the button is on, the last."""
        if str(pressed_on.id) == reply_id:
            return _Posted([pressed_on], [pressed_on.content])
        first = discord.PartialMessage(channel=pressed_on.channel, id=int(reply_id))
        me = self.client.user.id if self.client.user else None
        between = [
            message
            async for message in pressed_on.channel.history(
                limit=MAX_PARTS, after=first, before=pressed_on
            )
            if message.author.id == me
        ]
        messages: list[Handle] = [first, *between, pressed_on]
        return _Posted(messages, ["", *(m.content for m in between), pressed_on.content])

    async def _feedback(self, interaction: discord.Interaction, ref: ButtonRef) -> str:
        voter = str(interaction.user.id)
        counted = await self.engine.feedback(
            ref.conversation, ref.reply_id, voter, verdict(ref.action)
        )
        return THANKS if counted else UNCHANGED
