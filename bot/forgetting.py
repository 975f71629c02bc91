"""Forgetting a person on request: /forget on each platform, and the operators' CLI.

The work is `Engine.forget_user` (each conversation in its turn, so a reply being
written there is stored first and deleted with the rest); this module holds what the
person is told, and `python -m bot forget --platform P --user ID`, which needs only the
store (no model).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass

from bot.memory import Memory, open_memory
from bot.messages import ConversationKey
from bot.redis_client import REDIS_ERRORS
from bot.settings import ConfigError, Settings

log = logging.getLogger(__name__)

COMMAND_HELP = "Forget everything you told me, in every conversation (and my replies to it)"


@dataclass(frozen=True)
class Forgotten:
    """How much of one person went: their turns and the conversations they were in."""

    turns: int
    conversations: int


def describe(forgotten: Forgotten) -> str:
    """What the person is told, privately."""
    if forgotten.turns == 0:
        return "I had nothing stored from you: there was nothing to forget."
    one = forgotten.turns == 1
    messages = (
        "1 message you wrote, and my reply to it"
        if one
        else (f"{forgotten.turns:,} messages you wrote, and my replies to them")
    )
    places = "conversation" if forgotten.conversations == 1 else "conversations"
    return f"Done: I deleted {messages}, from {forgotten.conversations:,} {places}."


async def forget_person(
    memory: Memory,
    platform: str,
    user_id: str,
    *,
    also: Iterable[ConversationKey] = (),
    hold: Callable[[ConversationKey], AbstractAsyncContextManager[None]] | None = None,
    drop_cache: Callable[[str], None] | None = None,
) -> Forgotten:
    """Remove the person's turns, and the replies to them, everywhere on `platform`.

    Each conversation is done in its turn (`hold`: this process's order; the store's
    lock: other processes'), so a reply being written there is stored first, then
    deleted with the rest. `also`: conversations where the person's message is being
    answered now and may not be listed yet. `drop_cache`: forget a conversation's
    model cache.
    """
    listed = await memory.conversations_of(platform, user_id)
    turns = touched = 0
    for conversation in sorted({*listed, *also}, key=str):
        async with (hold or _no_hold)(conversation), memory.turn(conversation):
            removed = await memory.forget(conversation, user_id)
        if removed:
            turns += removed
            touched += 1
            if drop_cache is not None:
                drop_cache(str(conversation))
    log.info("Forgot %d turn(s) of a %s user in %d conversation(s)", turns, platform, touched)
    return Forgotten(turns, touched)


def _no_hold(_conversation: ConversationKey) -> AbstractAsyncContextManager[None]:
    return nullcontext()


async def forget_in_store(settings: Settings, platform: str, user_id: str) -> Forgotten:
    """Forget a person straight in the configured store (no engine, no model)."""
    memory = await open_memory(settings)
    try:
        return await forget_person(memory, platform, user_id)
    finally:
        await memory.close()


def forget_cli(settings: Settings, platform: str, user_id: str) -> int:
    """`python -m bot forget`: the exit code (0 done, 2 nothing to do it in)."""
    if settings.redis_url is None:
        raise ConfigError(
            "REDIS_URL is not set: without it, memory lives only in the running bot's "
            "process and ends with it. Ask the person to use /forget, or restart the bot."
        )
    user_id = user_id.strip()
    if not user_id:
        raise ConfigError("--user: give the person's platform id")
    try:
        forgotten = asyncio.run(forget_in_store(settings, platform, user_id))
    except REDIS_ERRORS as exc:  # after the start-up check: a timeout, a read-only replica
        log.error("Could not finish: Redis answered %s; nothing was reported done", exc)
        return 1
    print(  # noqa: T201 - the command's output
        f"Deleted {forgotten.turns:,} turn(s) by {platform} user {user_id}, and the bot's "
        f"replies to them, from {forgotten.conversations:,} conversation(s).",
        file=sys.stdout,
    )
    return 0
