"""The buttons under a Discord reply, as pure data: which buttons a reply carries
(Stop while it is written; Regenerate, 👍 and 👎 once it has ended) and their
`custom_id`s, encoded and parsed.

A `custom_id` names the conversation (channel, thread), the message that was asked
(what `Engine.stop` and `Engine.regenerate` name) and, once the reply has ended, the
reply's first message (what `Engine.feedback` counts votes on). It holds ids only,
never text anyone wrote, and stays within Discord's 100 characters. Being all the
state a button needs, a button still works after a restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from bot.messages import ConversationKey

PREFIX = "chatbot"
CUSTOM_ID_LIMIT = 100  # Discord's limit on a component's custom_id
_SNOWFLAKE = r"[0-9]{1,20}"


class Action(StrEnum):
    STOP = "stop"
    REGENERATE = "regen"
    UP = "up"
    DOWN = "down"


# What a press of each button matches, as discord.ui.DynamicItem's template; the
# reply id is there for every button but Stop.
TEMPLATE = re.compile(
    rf"{PREFIX}:(?P<action>stop|regen|up|down):(?P<channel>{_SNOWFLAKE}):"
    rf"(?P<thread>{_SNOWFLAKE}|-):(?P<message>{_SNOWFLAKE})(?::(?P<reply>{_SNOWFLAKE}))?"
)

# What the person who pressed a button is told, privately.
ENDED = "This reply has already ended."
NOT_YOURS_TO_STOP = (
    "Only the person who asked, or someone who may manage messages here, can stop this reply."
)
THANKS = "Thanks for the feedback!"
UNCHANGED = "Thanks, your feedback on this reply was already counted."


@dataclass(frozen=True)
class ButtonRef:
    """What one button is about: `message_id` is the asking message's platform id,
    `reply_id` the reply's first message ("" on Stop, posted before the reply ends)."""

    action: Action
    conversation: ConversationKey
    message_id: str
    reply_id: str = ""

    def custom_id(self) -> str:
        thread = self.conversation.thread or "-"
        parts = [PREFIX, self.action.value, self.conversation.channel, thread, self.message_id]
        if self.action is not Action.STOP:
            parts.append(self.reply_id)
        custom_id = ":".join(parts)
        if not TEMPLATE.fullmatch(custom_id):
            raise ValueError(f"not a button's ids: {self!r}")
        return custom_id


def parse(custom_id: str, platform: str = "discord") -> ButtonRef | None:
    """The button a `custom_id` names, or None for one that is not the bot's (or
    malformed: a Stop with a reply id, a Regenerate without one)."""
    match = TEMPLATE.fullmatch(custom_id)
    if match is None:
        return None
    action = Action(match["action"])
    reply = match["reply"] or ""
    if (action is Action.STOP) != (reply == ""):
        return None
    thread = None if match["thread"] == "-" else match["thread"]
    conversation = ConversationKey(platform, match["channel"], thread)
    return ButtonRef(action, conversation, match["message"], reply)


Style = Literal["danger", "primary", "secondary"]


@dataclass(frozen=True)
class ButtonSpec:
    """One button as shown: its label (or emoji alone), colour and custom_id."""

    custom_id: str
    label: str | None
    emoji: str | None
    style: Style


def streaming_buttons(conversation: ConversationKey, message_id: str) -> tuple[ButtonSpec, ...]:
    """Under the first message of a reply being written: Stop."""
    stop = ButtonRef(Action.STOP, conversation, message_id)
    return (ButtonSpec(stop.custom_id(), "Stop", "⏹️", "danger"),)


def ended_buttons(
    conversation: ConversationKey, message_id: str, reply_id: str
) -> tuple[ButtonSpec, ...]:
    """Under the last message of a reply that has ended: Regenerate, 👍, 👎."""

    def ref(action: Action) -> str:
        return ButtonRef(action, conversation, message_id, reply_id).custom_id()

    return (
        ButtonSpec(ref(Action.REGENERATE), "Regenerate", "🔄", "secondary"),
        ButtonSpec(ref(Action.UP), None, "👍", "secondary"),
        ButtonSpec(ref(Action.DOWN), None, "👎", "secondary"),
    )


def verdict(action: Action) -> str:
    """A feedback button's verdict, as `Engine.feedback` takes it."""
    return {Action.UP: "up", Action.DOWN: "down"}[action]


def may_stop(*, presser_id: str, asker_id: str, manages_messages: bool) -> bool:
    """Whether the person who pressed Stop may stop the reply: the asker, or someone
    allowed to manage messages in that channel."""
    return presser_id == asker_id or manages_messages
