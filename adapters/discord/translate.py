"""Pure translation between discord.py objects and the bot's common types.

No network here: which messages the bot answers, the conversation they belong to,
their text without the bot's mention, who may use the bot, and a reply as the list
of Discord messages to send.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable
from dataclasses import dataclass
from enum import StrEnum

import discord

from bot.messages import ConversationKey, Message
from bot.settings import Settings
from bot.splitting import split_message

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
NO_MENTIONS = discord.AllowedMentions.none()
# View channels, send messages (and in threads), read history, add reactions.
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    read_message_history=True,
    add_reactions=True,
)
HELP_LINE = (
    "Mention me with a question, reply to one of my messages, or send me a DM, and I'll "
    "answer. `/ask` asks privately-to-the-channel, `/reset` makes me forget this "
    "channel's conversation."
)
REFUSAL = "Sorry, I'm not available to you here."


class Trigger(StrEnum):
    MENTION = "mention"
    DIRECT = "direct message"
    REPLY = "reply to the bot"
    THREAD = "thread follow-up"


@dataclass(frozen=True)
class Identity:
    """Who the bot is on Discord: its user id and its managed roles' ids."""

    user_id: int
    role_ids: frozenset[int] = frozenset()

    def mention_pattern(self) -> re.Pattern[str]:
        forms = [rf"<@!?{self.user_id}>"] + [rf"<@&{role}>" for role in sorted(self.role_ids)]
        return re.compile("|".join(forms))


@dataclass(frozen=True)
class Rules:
    """Which messages to answer and who may use the bot; empty allow-lists allow all."""

    allow_bots: bool = False
    allow_dms: bool = True
    thread_followups: bool = True
    guilds: frozenset[str] = frozenset()
    channels: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            allow_bots=settings.discord_allow_bots,
            allow_dms=settings.discord_allow_dms,
            thread_followups=settings.discord_thread_followups,
            guilds=settings.discord_allowed_guilds,
            channels=settings.discord_allowed_channels,
            roles=settings.discord_allowed_roles,
            users=settings.discord_allowed_users,
        )

    def allows(
        self,
        *,
        user_id: int,
        role_ids: Iterable[int],
        guild_id: int | None,
        channel_ids: Iterable[int],
    ) -> bool:
        """The place (guild and channel, or a DM) and the person must both be allowed.

        A person is allowed when listed in the user allow-list or holding a role of the
        role allow-list (either list empty: that list admits nobody extra; both empty:
        everyone). `channel_ids` holds a thread's parent too, so allowing a channel
        allows its threads.
        """
        if self.users or self.roles:
            by_user = str(user_id) in self.users
            by_role = any(str(role) in self.roles for role in role_ids)
            if not (by_user or by_role):
                return False
        if guild_id is None:
            return self.allow_dms
        if self.guilds and str(guild_id) not in self.guilds:
            return False
        return not self.channels or any(str(c) in self.channels for c in channel_ids)


def place_ids(channel: object) -> list[int]:
    """The channel's id, and its parent's for a thread."""
    ids = [getattr(channel, "id", 0)]
    parent_id = getattr(channel, "parent_id", None)
    if isinstance(channel, discord.Thread) and parent_id:
        ids.append(parent_id)
    return ids


def member_role_ids(author: discord.User | discord.Member) -> list[int]:
    return [role.id for role in getattr(author, "roles", [])]


def trigger(
    message: discord.Message, me: Identity, rules: Rules, threads: Container[int]
) -> Trigger | None:
    """Why the bot should answer `message`, or None to stay silent."""
    if message.author.id == me.user_id:
        return None
    if message.type not in (discord.MessageType.default, discord.MessageType.reply):
        return None  # joins, pins, boosts and other system messages
    if message.author.bot and not rules.allow_bots:
        return None  # other bots (and webhooks): no bot-to-bot loops
    if message.guild is None:
        return Trigger.DIRECT
    if me.mention_pattern().search(message.content):
        return Trigger.MENTION
    reference = message.reference
    resolved = (reference.resolved or reference.cached_message) if reference else None
    if isinstance(resolved, discord.Message) and resolved.author.id == me.user_id:
        return Trigger.REPLY
    channel = message.channel
    if (
        rules.thread_followups
        and isinstance(channel, discord.Thread)
        and (channel.id in threads or channel.owner_id == me.user_id)
    ):
        return Trigger.THREAD
    return None


def conversation_key(channel: object) -> ConversationKey:
    """The channel's conversation; a thread's own inside threads; the DM channel's."""
    if isinstance(channel, discord.Thread):
        return ConversationKey(PLATFORM, str(channel.parent_id), str(channel.id))
    return ConversationKey(PLATFORM, str(getattr(channel, "id", "unknown")))


def strip_mentions(text: str, me: Identity) -> str:
    return re.sub(r"[ \t]{2,}", " ", me.mention_pattern().sub(" ", text)).strip()


def to_message(message: discord.Message, me: Identity) -> Message:
    return Message(
        conversation=conversation_key(message.channel),
        author_id=str(message.author.id),
        author_name=message.author.display_name,
        text=strip_mentions(message.content, me),
        message_id=str(message.id),
        timestamp=message.created_at,
        is_direct=message.guild is None,
    )


def reply_parts(text: str) -> list[str]:
    """A reply as Discord messages of at most 2,000 characters each."""
    return split_message(text, MESSAGE_LIMIT) or ["…"]


def invite_url(application_id: int) -> str:
    return discord.utils.oauth_url(
        application_id, permissions=PERMISSIONS, scopes=("bot", "applications.commands")
    )
