"""The platform-neutral message type that adapters build and the engine consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

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
class Message:
    """One incoming chat message, with the bot's mention already stripped from `text`."""

    conversation: ConversationKey
    author_id: str
    author_name: str
    text: str
    message_id: str = ""
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    is_direct: bool = False

    @property
    def platform(self) -> str:
        return self.conversation.platform


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored turn of a conversation."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The engine's whole answer to one message."""

    text: str
    ok: bool = True  # False when the text is the apology for a failed generation
    truncated_input: bool = False  # True when the user's message was cut to fit the model


def clean_text(text: str) -> str:
    """Text safe to tokenize and store: lone surrogates replaced, NUL bytes dropped.

    A lone surrogate (possible in JSON from a platform) cannot be encoded as UTF-8,
    which tokenizers and Redis need.
    """
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
