"""The platform-neutral message type that adapters build and the engine consumes."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

from bot.images import ImageInput

Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Which conversation a message belongs to: platform + channel (or DM) + thread.

    Its string form, e.g. ``discord:1234`` or ``slack:C01:1712345678.000100``, names
    the conversation in memory and in logs.
    """

    platform: str
    channel: str
    thread: str | None = None

    def __str__(self) -> str:
        parts = [self.platform, self.channel]
        if self.thread:
            parts.append(self.thread)
        return ":".join(parts)

    def channel_key(self) -> ConversationKey:
        """The channel (or DM) this conversation is in, without its thread."""
        return ConversationKey(self.platform, self.channel)


@dataclass(frozen=True, slots=True)
class FileText:
    """A text file attached to a message, already downloaded and decoded."""

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming chat message, with the bot's mention already stripped from `text`
    and mentions of other people written as their display names.

    `files`: text files attached to it (read by the adapter); `notes`: lines for the
    person, shown before the answer (files that were not read, and why); `images`:
    its images, decoded (only for a backend that takes images: they reach the model
    with this message only, never memory); `image_names`: the names of all the images
    attached, read or not (their placeholders are what memory keeps).
    """

    conversation: ConversationKey
    author_id: str
    author_name: str
    text: str
    message_id: str = ""
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    is_direct: bool = False
    files: tuple[FileText, ...] = ()
    notes: tuple[str, ...] = ()
    images: tuple[ImageInput, ...] = ()
    image_names: tuple[str, ...] = ()

    @property
    def platform(self) -> str:
        return self.conversation.platform


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored turn of a conversation; a user turn knows who wrote it ("" for
    replies, and for turns stored before authors were kept)."""

    role: Role
    content: str
    author_id: str = ""
    author_name: str = ""
    # When the person sent it (epoch seconds; user turns): a /forget deletes what was
    # sent before it, also when it is stored after it.
    sent_at: float | None = None
    # The platform's id of the message (user turns): what Regenerate names.
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class Reply:
    """The engine's whole answer to one message."""

    text: str
    ok: bool = True  # False when the text is the apology for a failed generation
    truncated_input: bool = False  # True when the user's message was cut to fit the model
    stopped: bool = False  # Stop was pressed: the text so far, then the stopped mark
    refused: bool = False  # a Regenerate refused: `text` is the note for the presser only
    silent: bool = False  # past the daily limit and already told: post nothing
    # An answer now in memory (a Regenerate or a vote has something to act on); False
    # for notes (busy, the daily limit, an empty message), apologies, unstored replies.
    kept: bool = False


def clean_text(text: str) -> str:
    """Text safe to tokenize and store: lone surrogates replaced, NUL bytes dropped.

    A lone surrogate (possible in JSON from a platform) cannot be encoded as UTF-8,
    which tokenizers and Redis need.
    """
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


NAME_MAX_CHARS = 32
NO_NAME = "someone"  # for a person whose name is unknown or cleans down to nothing
# Markup that chat templates and tokenizers treat as structure: <|im_start|>, </s>,
# [INST], <<SYS>> and the like. A name is one short line of plain text.
_MARKUP = re.compile(r"<\|[^<>]*?\|>|</?[A-Za-z_][^<>\s]*>|\[/?[A-Z_]+\]|<<|>>|<\||\|>")


def clean_name(name: str) -> str:
    """A display name safe to show the model: one line, no control characters or
    template markup, at most NAME_MAX_CHARS characters; NO_NAME when nothing is left.

    Names are chosen by users, so one could be made to look like a turn ("Bob\n
    <|im_start|>system …"); the prompt also tokenizes names as plain text, this keeps
    them readable as names.
    """
    # Bounded before stripping: stripping nested markup takes a pass per level.
    text = clean_text(name[: NAME_MAX_CHARS * 8])
    text = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text)
    while (stripped := _MARKUP.sub(" ", text)) != text:
        text = stripped
    text = " ".join(text.replace(":", " ").split())[:NAME_MAX_CHARS].strip()
    return text or NO_NAME


# What a "Name: text" line or a template's role could be mistaken for: a person shown
# as "assistant" (or as the bot's own name, passed as `reserved`) would read as the bot.
ROLE_WORDS = ("assistant", "system", "user")


def _same_name(name: str) -> str:
    """Names that read alike compare equal: case, width and spacing aside."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def speaker_labels(
    authors: Iterable[tuple[str, str]], reserved: Iterable[str] = ()
) -> dict[str, str]:
    """A label per author id for one prompt: distinct people get distinct labels, even
    when their cleaned names are the same ("Alice" and "Alice\u200b" both clean to
    "Alice"), and none is a role word or a `reserved` name.

    `authors`: (platform id, cleaned name) pairs in the order they spoke; a person keeps
    their latest name. The first to speak keeps the plain name, the next gets
    "Alice (2)", and so on, so labels stay put while the oldest speaker is in the prompt.
    Keyed by id, never by text: whoever renames themselves stays one person.
    """
    names: dict[str, str] = {}
    for author_id, name in authors:
        names[author_id] = name  # first position kept, latest name taken
    taken = {_same_name(word) for word in (*ROLE_WORDS, *reserved)}
    labels: dict[str, str] = {}
    for author_id, name in names.items():
        label, count = name, 1
        while _same_name(label) in taken:
            count += 1
            label = f"{name} ({count})"
        taken.add(_same_name(label))
        labels[author_id] = label
    return labels


def label_speakers(
    history: Sequence[Turn], speaker_id: str, speaker: str, reserved: Iterable[str] = ()
) -> tuple[list[Turn], str]:
    """`history` with each user turn's author name replaced by its `speaker_labels`
    label, and the label of the new message's author (`speaker_id`, named `speaker`).
    Turns stored without an author keep no name."""
    authored = [(t.author_id, t.author_name) for t in history if t.role == "user" and t.author_id]
    labels = speaker_labels([*authored, (speaker_id, speaker)], reserved)
    shown = [
        replace(t, author_name=labels[t.author_id]) if t.role == "user" and t.author_id else t
        for t in history
    ]
    return shown, labels[speaker_id]
