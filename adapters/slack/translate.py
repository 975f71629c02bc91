"""Pure translation between Slack event payloads and the bot's common types.

No network here: which events the bot answers, their conversation (channel + thread
root), their text without the bot's mention, who may use the bot, and model output
as safe Slack mrkdwn cut into messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from bot.messages import ConversationKey, Message
from bot.settings import Settings
from bot.splitting import split_message

PLATFORM = "slack"
MESSAGE_LIMIT = 3900  # Slack truncates text past 4,000 characters; keep a margin
# Message subtypes that are people writing: everything else (edits, deletions, joins,
# bot messages, channel topic changes...) is ignored.
ANSWERED_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})
HELP_TEXT = (
    "Mention me in a channel and I'll answer in a thread; reply in that thread and I'll "
    "follow without a new mention. DM me too. `/ask <question>` asks in this channel, "
    "`/reset` in a DM forgets our conversation."
)
REFUSAL = "Sorry, I'm not available to you here."
# /ask where the bot cannot post, by kind of place (Slack answers channel_not_found
# or not_in_channel): a DM between other people can never take the bot.
CANNOT_POST = {
    "channel": "I can't post in this channel: invite me first (`/invite @chatbot`).",
    "group_dm": "I can't post in this group DM: add me to it, or ask me in a channel or "
    "in a DM with me.",
    "dm": "I can only answer in my own DMs: message me directly (Apps > chatbot), or ask "
    "in a channel I'm in.",
}


class Trigger(StrEnum):
    MENTION = "mention"
    DIRECT = "direct message"
    THREAD = "thread follow-up"
    ASSISTANT = "assistant thread"


@dataclass(frozen=True)
class Rules:
    """Who may use the bot where. Every entry point (mention, DM, thread follow-up,
    assistant panel, slash commands) goes through `allows`."""

    thread_followups: bool = True
    allow_dms: bool = True
    channels: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        allow_dms = settings.slack_allow_dms
        if allow_dms is None:
            # Unset: a channel allow-list also closes DMs (and the assistant panel,
            # which is a DM), so restricting channels restricts the whole bot.
            allow_dms = not settings.slack_allowed_channels
        return cls(
            thread_followups=settings.slack_thread_followups,
            allow_dms=allow_dms,
            channels=settings.slack_allowed_channels,
            users=settings.slack_allowed_users,
        )

    def allows(self, *, user: str, channel: str, is_direct: bool) -> bool:
        """The user list (if set) and the place: a DM with the bot by `allow_dms`, any
        other conversation (channel, private channel, group DM) by the channel list
        (empty: all)."""
        if self.users and user not in self.users:
            return False
        if is_direct:
            return self.allow_dms
        return not self.channels or channel in self.channels


def is_person_writing(event: Mapping[str, Any], bot_user_id: str) -> bool:
    """False for the bot's own and other bots' messages, edits, joins and the like."""
    if event.get("bot_id") or event.get("bot_profile"):
        return False
    if event.get("subtype") not in ANSWERED_SUBTYPES:
        return False
    user = event.get("user")
    return bool(user) and user != bot_user_id


def mention_pattern(bot_user_id: str) -> re.Pattern[str]:
    return re.compile(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>")


def mentions(event: Mapping[str, Any], bot_user_id: str) -> bool:
    return bool(mention_pattern(bot_user_id).search(event.get("text") or ""))


def is_direct(event: Mapping[str, Any]) -> bool:
    """A DM with the bot. Slack delivers message events only from conversations the
    bot is in, and marks a DM's as channel_type "im"; a `D…` id alone says nothing
    (a DM between two people has one too), and a group DM is "mpim"."""
    return event.get("channel_type") == "im"


def command_place(command: Mapping[str, Any]) -> str:
    """Where a slash command was typed: "dm" (a 1:1 DM, with the bot or between two
    people), "group_dm" or "channel". Whether a "dm" is the bot's own takes a look-up."""
    name = str(command.get("channel_name", ""))
    if name == "directmessage":
        return "dm"
    if name.startswith("mpdm-"):
        return "group_dm"
    return "channel"


def command_text(command: Mapping[str, Any]) -> str:
    """A slash command's text as typed: Slack sends &, < and > HTML-escaped."""
    return unescape(str(command.get("text", ""))).strip()


def conversation_key(event: Mapping[str, Any]) -> ConversationKey:
    """Channel + thread root: a top-level channel message starts a thread keyed by its
    own ts. A DM's top-level messages are one conversation (the DM itself)."""
    channel = str(event.get("channel", ""))
    thread = event.get("thread_ts")
    if thread:
        return ConversationKey(PLATFORM, channel, str(thread))
    if is_direct(event):
        return ConversationKey(PLATFORM, channel)
    return ConversationKey(PLATFORM, channel, str(event.get("ts", "")))


def reply_thread(event: Mapping[str, Any]) -> str | None:
    """Where replies go: the event's thread, a new thread on a channel message, or
    (None) straight into a DM."""
    if event.get("thread_ts"):
        return str(event["thread_ts"])
    if is_direct(event):
        return None
    return str(event.get("ts", "")) or None


def strip_mention(text: str, bot_user_id: str) -> str:
    return re.sub(r"[ \t]{2,}", " ", mention_pattern(bot_user_id).sub(" ", text)).strip()


def unescape(text: str) -> str:
    """Slack escapes &, < and > in message text; the model should read them plainly."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def to_message(event: Mapping[str, Any], bot_user_id: str) -> Message:
    ts = str(event.get("ts", "0"))
    try:
        when = datetime.fromtimestamp(float(ts), UTC)
    except ValueError:
        when = datetime.now(UTC)
    return Message(
        conversation=conversation_key(event),
        author_id=str(event.get("user", "")),
        author_name=str(event.get("user", "")),
        text=unescape(strip_mention(event.get("text") or "", bot_user_id)),
        message_id=ts,
        timestamp=when,
        is_direct=is_direct(event),
    )


# --- model Markdown to Slack mrkdwn ---------------------------------------------------------

_CODE = re.compile(r"```.*?(?:```|\Z)|`[^`\n]+`", re.DOTALL)
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^\s()<>|]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_ITALIC = re.compile(r"(?<![*\w])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![*\w])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", re.MULTILINE)


def escape(text: str) -> str:
    """Slack's own escaping: after it, no `<!channel>`, `<!here>`, `<@U…>` can form."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _prose(text: str) -> str:
    text = escape(text.replace("\x00", "").replace("\x01", ""))  # our placeholders below
    links: list[str] = []

    def keep_link(match: re.Match[str]) -> str:
        # The URL was escaped with the rest; it holds no < > | by the pattern above.
        links.append(f"<{match.group(2)}|{match.group(1)}>")
        return f"\x00{len(links) - 1}\x00"

    text = _LINK.sub(keep_link, text)
    text = _HEADING.sub(lambda m: f"\x01{m.group(1)}\x01", text)
    text = _BOLD.sub(lambda m: f"\x01{m.group(1) or m.group(2)}\x01", text)
    text = _ITALIC.sub(lambda m: f"_{m.group(1)}_", text)
    text = _STRIKE.sub(lambda m: f"~{m.group(1)}~", text)
    text = text.replace("\x01", "*")
    return re.sub(r"\x00(\d+)\x00", lambda m: links[int(m.group(1))], text)


def to_mrkdwn(markdown: str) -> str:
    """Model Markdown as Slack mrkdwn: bold, italics, strike, links, headings, code.

    Code keeps its text (escaped, as Slack requires); only prose is converted.
    """
    out: list[str] = []
    position = 0
    for match in _CODE.finditer(markdown):
        out.append(_prose(markdown[position : match.start()]))
        code = match.group(0)
        if code.startswith("```"):
            # Slack ignores a language tag: drop it rather than show it as code.
            code = re.sub(r"^```[^\s`]*\n", "```\n", code)
        out.append(escape(code))
        position = match.end()
    out.append(_prose(markdown[position:]))
    return "".join(out)


def reply_parts(markdown: str) -> list[str]:
    """Model output as Slack messages: mrkdwn, each under Slack's length limit."""
    return split_message(to_mrkdwn(markdown), MESSAGE_LIMIT) or ["…"]
