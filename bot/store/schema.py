"""How conversations are laid out in the store: Redis key names (hash-tagged for Redis
Cluster), the JSON of a stored turn, and the pure list operations that Redis's scripts
and the in-process store share.

Redis key schema: one list per conversation, one string per channel persona, one set
per person of the conversations holding their turns, and a lock per conversation,

    chatbot:conv:{<platform>:<channel>}[:<thread>]  ->  [turn JSON, ...]  (oldest first)
    chatbot:persona:{<platform>:<channel>}          ->  the channel's system prompt
    chatbot:user:{<platform>:<user id>}             ->  {["<platform>", "<channel>",
                                                         "<thread>" | null], ...}
    chatbot:lock:{<platform>:<channel>}[:<thread>]  ->  the lock's token
    chatbot:append:{<platform>:<channel>}:<token>   ->  an append already done
    chatbot:forgotten:{<platform>:<user id>}        ->  when they last used /forget
    chatbot:usage:{<platform>:<user id>}:<day>      ->  tokens used that UTC day
    chatbot:usage:{<platform>:<user id>}:<day>:told ->  the limit's note was sent
    chatbot:vote:{<platform>:<channel>}:<reply id>  ->  {voter id: "up" | "down"}

each list element ``{"role": "user" | "assistant", "content": "...", "author_id": "...",
"author_name": "...", "at": <epoch seconds sent>, "id": "<platform message id>"}``
(author, time and id only on user turns). The braces are Redis Cluster hash tags: a
channel's keys share a slot, and no command ever spans two slots; a person's set,
/forget mark and counters share theirs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from bot.messages import ConversationKey, Turn

KEY_PREFIX = "chatbot:conv:"
PERSONA_PREFIX = "chatbot:persona:"
APPEND_PREFIX = "chatbot:append:"
LOCK_PREFIX = "chatbot:lock:"
USER_PREFIX = "chatbot:user:"
FORGOTTEN_PREFIX = "chatbot:forgotten:"
USAGE_PREFIX = "chatbot:usage:"
VOTE_PREFIX = "chatbot:vote:"


def whole_exchanges(max_turns: int) -> int:
    """The turn cap as whole exchanges (a message and its reply): an odd cap would
    leave a history that starts with a reply, which strict chat templates refuse."""
    return max(2, max_turns - max_turns % 2)


def from_first_user_turn(turns: list[Turn]) -> list[Turn]:
    start = next((i for i, t in enumerate(turns) if t.role == "user"), len(turns))
    return turns[start:]


def _slot(conversation: ConversationKey) -> str:
    return f"{{{conversation.platform}:{conversation.channel}}}"


def redis_key(conversation: ConversationKey) -> str:
    thread = f":{conversation.thread}" if conversation.thread else ""
    return f"{KEY_PREFIX}{_slot(conversation)}{thread}"


def persona_key(conversation: ConversationKey) -> str:
    return f"{PERSONA_PREFIX}{_slot(conversation)}"


def user_key(platform: str, user_id: str) -> str:
    return f"{USER_PREFIX}{{{platform}:{user_id}}}"


def forgotten_key(platform: str, user_id: str) -> str:
    """The time of the person's last /forget; in their list's slot."""
    return f"{FORGOTTEN_PREFIX}{{{platform}:{user_id}}}"


def encode_conversation(conversation: ConversationKey) -> str:
    return json.dumps([conversation.platform, conversation.channel, conversation.thread])


def decode_conversation(raw: str | bytes) -> ConversationKey | None:
    try:
        platform, channel, thread = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if not all(isinstance(part, str) for part in (platform, channel)):
        return None
    return ConversationKey(platform, channel, thread if isinstance(thread, str) else None)


def authors(turns: Sequence[Turn]) -> set[str]:
    return {turn.author_id for turn in turns if turn.role == "user" and turn.author_id}


def forgotten_by(turn: Turn, author_id: str, before: float | None) -> bool:
    """Whether a /forget by `author_id` at `before` (None: whenever) takes `turn`: their
    user turns sent before it (and any of theirs stored without a time)."""
    if turn.role != "user" or turn.author_id != author_id:
        return False
    return before is None or turn.sent_at is None or turn.sent_at <= before


def without_author(
    turns: Sequence[Turn], author_id: str, before: float | None = None
) -> tuple[list[Turn], int]:
    """`turns` without the author's user turns sent before `before` and the replies to
    them (what FORGET does in Redis), and how many of their turns went."""
    kept: list[Turn] = []
    removed = 0
    drop_reply = False
    for turn in turns:
        if forgotten_by(turn, author_id, before):
            removed += 1
            drop_reply = True
        elif turn.role == "assistant" and drop_reply:
            drop_reply = False
        else:
            drop_reply = False
            kept.append(turn)
    return kept, removed


def usage_key(platform: str, user_id: str, day: str) -> str:
    """A person's token count for one UTC day (`day`: ISO date); in their slot."""
    return f"{USAGE_PREFIX}{{{platform}:{user_id}}}:{day}"


def vote_key(conversation: ConversationKey, reply_id: str) -> str:
    """The votes on one reply; in its channel's slot."""
    return f"{VOTE_PREFIX}{_slot(conversation)}:{reply_id}"


def append_key(conversation: ConversationKey, token: str) -> str:
    """Where an append's token is remembered (idempotent appends)."""
    return f"{APPEND_PREFIX}{_slot(conversation)}:{token}"


def lock_key(conversation: ConversationKey) -> str:
    thread = f":{conversation.thread}" if conversation.thread else ""
    return f"{LOCK_PREFIX}{_slot(conversation)}{thread}"


def encode_turn(turn: Turn) -> str:
    data: dict[str, str | float] = {"role": turn.role, "content": turn.content}
    if turn.author_id:
        data |= {"author_id": turn.author_id, "author_name": turn.author_name}
    if turn.sent_at is not None:
        data["at"] = turn.sent_at
    if turn.message_id:
        data["id"] = turn.message_id
    return json.dumps(data, ensure_ascii=False)


def decode_turn(raw: str | bytes) -> Turn | None:
    """A stored turn, or None for an element this code did not write."""
    try:
        data = json.loads(raw)
        role, content = data["role"], data["content"]
    except (ValueError, TypeError, KeyError):
        return None
    if role not in ("user", "assistant") or not isinstance(content, str):
        return None
    author_id, author_name, at = data.get("author_id"), data.get("author_name"), data.get("at")
    message_id = data.get("id")
    return Turn(
        role=role,
        content=content,
        author_id=author_id if isinstance(author_id, str) else "",
        author_name=author_name if isinstance(author_name, str) else "",
        sent_at=float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None,
        message_id=message_id if isinstance(message_id, str) else "",
    )
