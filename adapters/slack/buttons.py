"""The buttons under the bot's replies, pure: Block Kit blocks for a reply's messages,
and a `block_actions` payload read back.

While a reply is written its first message carries Stop; once it has ended, its last
message carries Regenerate, 👍 and 👎. Handlers are found by `action_id` (fixed
names, never user text), and everything a handler needs is in the button's `value`:
the conversation (channel, thread), the asking message's ts, whether it is a DM with
the bot, the reply's earlier messages and how many times it was regenerated. So a
button works on any replica and after a restart; the engine and memory say whether
it is still in time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from adapters.slack.translate import PLATFORM
from bot.messages import ConversationKey

STOP = "chatbot_stop"
REGENERATE = "chatbot_regenerate"
VOTE_UP = "chatbot_vote_up"
VOTE_DOWN = "chatbot_vote_down"
ACTION_IDS = frozenset({STOP, REGENERATE, VOTE_UP, VOTE_DOWN})
VERDICTS = {VOTE_UP: "up", VOTE_DOWN: "down"}
BLOCK_ID = "chatbot_reply_actions"
VALUE_LIMIT = 2000  # Block Kit: a button's value

# What a press is answered with, privately.
STOP_ENDED = "That reply has already ended."
STOP_NOT_YOURS = "Only the person who asked can stop this reply."
THANKS = "Thanks for the feedback!"
ALREADY_VOTED = "You've already given that vote to this reply."


@dataclass(frozen=True)
class ReplyRef:
    """A reply, as its buttons name it: its conversation, the message it answers, and
    (on its last message) the messages before that one."""

    channel: str
    thread: str | None  # the conversation's thread: also where the reply is posted
    message_id: str  # the asking message's ts (Message.message_id)
    is_direct: bool = False  # a DM with the bot (for the allow-lists)
    earlier: tuple[str, ...] = ()  # ts of the reply's messages before the pressed one
    generation: int = 0  # 0: the first reply; n: its n-th regeneration

    @property
    def conversation(self) -> ConversationKey:
        return ConversationKey(PLATFORM, self.channel, self.thread)

    def value(self) -> str:
        """The button's value: compact JSON, ids and numbers only."""
        data: dict[str, Any] = {"c": self.channel, "t": self.thread, "m": self.message_id}
        if self.is_direct:
            data["d"] = 1
        if self.earlier:
            data["r"] = list(self.earlier)
        if self.generation:
            data["g"] = self.generation
        return json.dumps(data, separators=(",", ":"))


def _button(action_id: str, label: str, value: str, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "action_id": action_id,
        "text": {"type": "plain_text", "text": label, "emoji": True},
        "value": value,
    }
    if style is not None:
        button["style"] = style
    return button


def stop_actions(ref: ReplyRef) -> dict[str, Any]:
    """The actions block of a reply being written (on its first message)."""
    return {
        "type": "actions",
        "block_id": BLOCK_ID,
        "elements": [_button(STOP, "Stop", ref.value(), "danger")],
    }


def final_actions(ref: ReplyRef) -> dict[str, Any]:
    """The actions block of a reply that has ended (on its last message): Regenerate
    and the votes. Past the value's limit (a reply of some hundred messages) the
    earlier messages cannot all be named: then the votes only, naming the first."""
    value = ref.value()
    elements: list[dict[str, Any]] = []
    if len(value) <= VALUE_LIMIT:
        elements.append(_button(REGENERATE, "Regenerate", value))
    else:
        value = replace(ref, earlier=ref.earlier[:1]).value()
    elements.append(_button(VOTE_UP, "👍", value))
    elements.append(_button(VOTE_DOWN, "👎", value))
    return {"type": "actions", "block_id": BLOCK_ID, "elements": elements}


def message_blocks(part: str, actions: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One reply message: its mrkdwn `part` (at most `translate.MESSAGE_LIMIT`
    characters, as `reply_parts` cuts them: Block Kit's limit for a section) in a
    section, then the buttons, if any. The message's `text` stays the same part: Slack
    shows it in notifications."""
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": part, "verbatim": True}}
    ]
    if actions is not None:
        blocks.append(dict(actions))
    return blocks


@dataclass(frozen=True)
class Press:
    """One button pressed: which, by whom, on which message of which reply."""

    action: str  # one of ACTION_IDS
    user: str
    ref: ReplyRef
    message_ts: str  # the message the button is on

    @property
    def reply_messages(self) -> tuple[str, ...]:
        """The reply's messages, first to the pressed one (on Regenerate: all)."""
        return (*self.ref.earlier, self.message_ts)

    @property
    def reply_id(self) -> str:
        """The reply's id for feedback: its first message, and which regeneration."""
        first = self.reply_messages[0]
        return f"{first}#{self.ref.generation}" if self.ref.generation else first


def _text(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    return value if isinstance(value, str) else ""


def _ref(value: str) -> ReplyRef | None:
    try:
        data = json.loads(value)
    except (ValueError, RecursionError):  # a value nested past the parser's depth
        return None
    if not isinstance(data, dict):
        return None
    channel, message_id, thread = data.get("c"), data.get("m"), data.get("t")
    earlier, generation = data.get("r", []), data.get("g", 0)
    if not (isinstance(channel, str) and channel and isinstance(message_id, str) and message_id):
        return None
    if thread is not None and not isinstance(thread, str):
        return None
    if not isinstance(earlier, list) or not all(isinstance(ts, str) for ts in earlier):
        return None
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
        return None
    return ReplyRef(channel, thread, message_id, data.get("d") == 1, tuple(earlier), generation)


def parse_press(body: Mapping[str, Any]) -> Press | None:
    """A `block_actions` payload's press of one of the bot's buttons; None for anything
    else (another kind of interaction, a button not the bot's, a value it did not
    write, a message in another channel than the value names)."""
    if body.get("type") != "block_actions":
        return None
    actions = body.get("actions")
    if not isinstance(actions, Sequence) or not actions or not isinstance(actions[0], Mapping):
        return None
    action = actions[0]
    action_id = _text(action, "action_id")
    if action_id not in ACTION_IDS:
        return None
    ref = _ref(_text(action, "value"))
    user = body.get("user")
    container = body.get("container")
    if ref is None or not isinstance(user, Mapping) or not isinstance(container, Mapping):
        return None
    channel = _text(container, "channel_id")
    if not channel and isinstance(body.get("channel"), Mapping):
        channel = _text(body["channel"], "id")
    message = body.get("message")
    message_ts = _text(container, "message_ts")
    if not message_ts and isinstance(message, Mapping):
        message_ts = _text(message, "ts")
    if channel != ref.channel or not message_ts or not _text(user, "id"):
        return None
    return Press(action_id, _text(user, "id"), ref, message_ts)
