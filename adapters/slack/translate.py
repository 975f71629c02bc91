"""Pure translation between Slack event payloads and the bot's common types.

No network here: which events the bot answers, their conversation (channel + thread
root), their text as the model reads it (the bot's mention stripped, other mentions as
names), the files shared with them, who may use the bot, and model output as safe
Slack mrkdwn cut into messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from bot.attachments import FileRef, ReadFiles
from bot.messages import NO_NAME, ConversationKey, Message, clean_name
from bot.settings import Settings
from bot.splitting import split_message

PLATFORM = "slack"
# Each message's text is also its Block Kit section (the buttons need blocks), whose
# text is at most 3,000 characters (a message's own `text`: 4,000).
MESSAGE_LIMIT = 3000
# Message subtypes that are people writing: everything else (edits, deletions, joins,
# bot messages, channel topic changes...) is ignored.
ANSWERED_SUBTYPES = frozenset({None, "file_share", "thread_broadcast"})
HELP_TEXT = (
    "Mention me in a channel and I'll answer in a thread; reply in that thread and I'll "
    "follow without a new mention. DM me too, and attach text files for me to read. "
    "`/ask <question>` asks in this channel, `/reset` in a DM forgets our conversation, "
    "`/forget` makes me forget everything you told me, everywhere, `/usage` shows what "
    "you've used today."
)
# Who wrote a message, or whom it mentions, when Slack would not say (users.info failed):
# never the raw id, which means nothing to the model and would be stored.
NEUTRAL_NAME = NO_NAME
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
    """`text` without the bot's mention, and the spaces around it (only there: code in
    the message keeps its indentation)."""
    pattern = rf"[ \t]*{mention_pattern(bot_user_id).pattern}[ \t]*"
    return re.sub(pattern, " ", text).strip()


def unescape(text: str) -> str:
    """Slack escapes &, < and > in message text; the model should read them plainly."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


# In message text a real < is always escaped, so <…> is Slack markup: a user, channel,
# special mention or a link. Both are translated in one pass, so that a name put in
# for a mention is never unescaped again.
_MARKUP = re.compile(r"<([^<>]*)>|&(lt|gt|amp);")
_ENTITIES = {"lt": "<", "gt": ">", "amp": "&"}
_USER = re.compile(r"<@([A-Z0-9]+)(?:\|[^>]*)?>")
_BROADCASTS = frozenset({"here", "channel", "everyone"})


# Names looked up per message at most: a pasted wall of mentions must not fire
# thousands of users.info calls (the rest read as their label, or "someone").
MENTION_LOOKUPS = 20


def mentioned_users(text: str, bot_user_id: str) -> set[str]:
    """The ids of the people a message's text mentions (not the bot), the first
    MENTION_LOOKUPS of them."""
    found = dict.fromkeys(u for u in _USER.findall(text) if u != bot_user_id)
    return set(list(found)[:MENTION_LOOKUPS])


def _as_text(markup: str, names: Mapping[str, str]) -> str:
    target, _, label = markup.partition("|")
    label = unescape(label).strip()
    if target.startswith("@"):  # a person: <@U123> or <@U123|legacy name>
        return "@" + clean_name(names.get(target[1:]) or label or NEUTRAL_NAME)
    if target.startswith("#"):  # a channel: <#C123|general>, the name sometimes empty
        return "#" + (" ".join(label.split()) or "channel")
    if target.startswith("!"):  # <!here>, <!subteam^S1|@team>, <!date^…|fallback>
        if label:
            return label
        kind = target[1:].split("^")[0]
        return f"@{kind}" if kind in _BROADCASTS else "@group" if kind == "subteam" else ""
    url = unescape(target)  # a link: <https://a.b>, <https://a.b|text>, <mailto:x|x>
    if url.startswith("mailto:"):
        return label or url.removeprefix("mailto:")
    return f"{label} ({url})" if label and label not in url else url


def readable(text: str, bot_user_id: str, names: Mapping[str, str]) -> str:
    """A message's text as the model reads it: without the bot's mention, people
    mentioned by their display names (`names`: id -> name; else the label Slack sent,
    else NEUTRAL_NAME), never their ids; channels as #name; @here as text; links as
    their URLs; &, < and > unescaped."""

    def plain(match: re.Match[str]) -> str:
        entity = match.group(2)
        return _ENTITIES[entity] if entity else _as_text(match.group(1), names)

    return _MARKUP.sub(plain, strip_mention(text, bot_user_id)).strip()


def to_message(
    event: Mapping[str, Any],
    bot_user_id: str,
    names: Mapping[str, str] | None = None,
    attached: ReadFiles | None = None,
) -> Message:
    """The event as the engine's Message. `names`: display names by user id (the
    author's and the mentioned people's, looked up by the client); `attached`: the
    files read from the event's `files`, and notes about those that weren't."""
    names = names or {}
    attached = attached or ReadFiles()
    ts = str(event.get("ts", "0"))
    try:
        when = datetime.fromtimestamp(float(ts), UTC)
    except ValueError:
        when = datetime.now(UTC)
    author = str(event.get("user", ""))
    return Message(
        conversation=conversation_key(event),
        author_id=author,
        author_name=names.get(author) or NEUTRAL_NAME,
        text=readable(event.get("text") or "", bot_user_id, names),
        message_id=ts,
        timestamp=when,
        is_direct=is_direct(event),
        files=attached.files,
        notes=attached.notes,
        images=attached.images,
        image_names=attached.image_names,
    )


def is_empty(event: Mapping[str, Any], bot_user_id: str) -> bool:
    """Nothing to answer: no text besides the bot's mention, and no files."""
    return not strip_mention(event.get("text") or "", bot_user_id) and not _file_objects(event)


def user_name(user: Mapping[str, Any]) -> str:
    """A person's name from users.info's `user` object: the display name they chose,
    else their full name, else their handle ("" if none)."""
    profile = user.get("profile") or {}
    for name in (profile.get("display_name"), profile.get("real_name"), user.get("real_name")):
        if isinstance(name, str) and name.strip():
            return name
    name = user.get("name")
    return name if isinstance(name, str) else ""


# --- files shared in a message -----------------------------------------------------------


@dataclass(frozen=True)
class SharedFiles:
    """A message's `files`: those that can be downloaded, those whose details only
    files.info gives (Slack Connect: `file_access: check_file_info`), and how many the
    bot cannot see at all (hidden past a free plan's limit, deleted, or external)."""

    refs: tuple[FileRef, ...] = ()
    to_look_up: tuple[str, ...] = ()
    unavailable: int = 0


def _file_objects(event: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    files = event.get("files")
    if not isinstance(files, list):
        return []
    return [f for f in files if isinstance(f, Mapping)]


def file_ref(file: Mapping[str, Any]) -> FileRef | None:
    """A Slack file object as a FileRef; None if it cannot be downloaded."""
    if file.get("mode") in ("hidden_by_limit", "tombstone") or file.get("is_external"):
        return None
    url = file.get("url_private_download") or file.get("url_private")
    if not isinstance(url, str) or not url:
        return None
    try:
        size = int(file.get("size") or 0)
    except (TypeError, ValueError):
        size = 0
    name = file.get("name") or file.get("title") or file.get("id") or ""
    return FileRef(str(name), size, str(file.get("mimetype") or ""), url)


def shared_files(event: Mapping[str, Any]) -> SharedFiles:
    refs: list[FileRef] = []
    to_look_up: list[str] = []
    unavailable = 0
    for file in _file_objects(event):
        if file.get("file_access") == "check_file_info" and file.get("id"):
            to_look_up.append(str(file["id"]))
        elif (ref := file_ref(file)) is not None:
            refs.append(ref)
        else:
            unavailable += 1
    return SharedFiles(tuple(refs), tuple(to_look_up), unavailable)


def unavailable_note(count: int) -> str:
    """The note for files the bot cannot see (SharedFiles.unavailable)."""
    if count == 1:
        return "(I couldn't open an attached file: Slack doesn't let me see it.)"
    return f"(I couldn't open {count} attached files: Slack doesn't let me see them.)"


def is_slack_file_url(url: str, api_base_url: str) -> bool:
    """Whether the bot token may be sent to `url`: Slack's own HTTPS hosts (files are
    on files.slack.com), or the host the Web API client talks to (a local fake)."""
    parts, api = urlsplit(url), urlsplit(api_base_url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" and (host == "slack.com" or host.endswith(".slack.com")):
        return True
    return (parts.scheme, parts.netloc) == (api.scheme, api.netloc) and bool(host)


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
