"""Pure translation between discord.py objects and the bot's common types.

No network here: which messages the bot answers, the conversation they belong to,
their text without the bot's mention and with other mentions as names, their
attachments as file references, who may use the bot, and a reply as the list of
Discord messages to send.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import discord

from bot.attachments import FileRef
from bot.messages import NO_NAME, ConversationKey, Message, clean_name
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
    "answer; I read attached text files too. `/ask` asks privately-to-the-channel, "
    "`/reset` makes me forget this channel's conversation, `/forget` deletes everything "
    "you've told me, everywhere, and `/usage` shows what you've used today. Under my "
    "replies: Stop while I write, then Regenerate, 👍 and 👎."
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
        """The bot's mentions, with the spaces and tabs around them (not newlines)."""
        forms = [rf"<@!?{self.user_id}>"] + [rf"<@&{role}>" for role in sorted(self.role_ids)]
        return re.compile(rf"[ \t]*(?:{'|'.join(forms)})[ \t]*")


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
    """`text` without the bot's mentions; only the spaces around a mention collapse,
    so pasted code keeps its indentation."""
    return me.mention_pattern().sub(" ", text).strip()


# Discord's mention syntax (https://discord.com/developers/docs/reference#message-formatting).
USER_MENTION = re.compile(r"<@!?([0-9]{15,20})>")
ROLE_MENTION = re.compile(r"<@&([0-9]{15,20})>")
CHANNEL_MENTION = re.compile(r"<#([0-9]{15,20})>")


@dataclass(frozen=True)
class Names:
    """Names for the ids a text mentions: people's display names, roles, channels."""

    users: Mapping[int, str] = field(default_factory=dict)
    roles: Mapping[int, str] = field(default_factory=dict)
    channels: Mapping[int, str] = field(default_factory=dict)


def readable_mentions(text: str, names: Names) -> str:
    """Mentions as the Discord client shows them: `@Display Name`, `@role`, `#channel`.

    The model never sees a raw id (meaningless to it, and easily repeated into a reply);
    an id without a name is `@someone`. Names are chosen by users, so they are cleaned
    like authors' names: a name cannot bring a line break or template markup along.
    """

    def name(table: Mapping[int, str], match: re.Match[str], unknown: str) -> str:
        known = table.get(int(match[1]), "").lstrip("@#")  # the @everyone role's name
        return clean_name(known) if known.strip() else unknown

    text = USER_MENTION.sub(lambda m: "@" + name(names.users, m, NO_NAME), text)
    text = ROLE_MENTION.sub(lambda m: "@" + name(names.roles, m, "some-role"), text)
    return CHANNEL_MENTION.sub(lambda m: "#" + name(names.channels, m, "some-channel"), text)


def message_names(message: discord.Message) -> Names:
    """The names Discord sent with a message for the people, roles and channels it
    mentions (a guild's channels from discord.py's cache of the guild)."""
    return Names(
        users={user.id: user.display_name for user in message.mentions},
        roles={role.id: role.name for role in message.role_mentions},
        channels={channel.id: channel.name for channel in message.channel_mentions},
    )


def interaction_names(interaction: discord.Interaction, text: str) -> Names:
    """Names for the mentions in a slash command's text option.

    Discord sends resolved users, roles and channels only for options of those types,
    not for mentions typed into a string, so names come from what discord.py has
    cached: the guild's roles and channels (all of them), the person running the
    command, and whichever members and users it has seen; others stay `@someone`.
    """
    guild = interaction.guild
    users: dict[int, str] = {interaction.user.id: interaction.user.display_name}
    for user_id in map(int, USER_MENTION.findall(text)):
        member = guild.get_member(user_id) if guild else None
        person = member or interaction.client.get_user(user_id)
        if person is not None:
            users[user_id] = person.display_name
    if guild is None:
        return Names(users)
    roles = {
        role.id: role.name
        for role in map(guild.get_role, map(int, ROLE_MENTION.findall(text)))
        if role is not None
    }
    channels = {
        channel.id: channel.name
        for channel in map(guild.get_channel_or_thread, map(int, CHANNEL_MENTION.findall(text)))
        if channel is not None
    }
    return Names(users, roles, channels)


def file_refs(message: discord.Message) -> tuple[FileRef, ...]:
    """The message's attachments as the platform describes them (name, declared size,
    content type, CDN URL); whether and how they are read is `bot.attachments`'."""
    return tuple(
        FileRef(a.filename, a.size, a.content_type or "", a.url) for a in message.attachments
    )


def to_message(message: discord.Message, me: Identity) -> Message:
    """The message as the engine takes it (its attachments are read apart: they take
    downloads)."""
    text = strip_mentions(message.content, me)
    return Message(
        conversation=conversation_key(message.channel),
        author_id=str(message.author.id),
        author_name=message.author.display_name,
        text=readable_mentions(text, message_names(message)),
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
