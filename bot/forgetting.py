"""Forgetting a person on request: /forget on each platform, and the operators' CLI.

The work is `Engine.forget_user` (each conversation in its turn, so a reply being
written there is stored first and deleted with the rest) over the store's
`bot.store.forgetting`; this module holds what the person is told, and
`python -m bot forget --platform P --user ID`, which needs only the store (no model).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from bot.settings import ConfigError, Settings
from bot.store.connection import REDIS_ERRORS
from bot.store.forgetting import Forgotten, forget_person
from bot.store.memory import open_memory

log = logging.getLogger(__name__)

COMMAND_HELP = "Forget everything you told me, in every conversation (and my replies to it)"


def describe(forgotten: Forgotten) -> str:
    """What the person is told, privately."""
    if forgotten.turns == 0:
        # Not "there was nothing": a message of theirs still being answered when they
        # asked is deleted as it is stored, and not counted here.
        return "Done: nothing you wrote is stored any more (I had nothing else from you)."
    one = forgotten.turns == 1
    messages = (
        "1 message you wrote, and my reply to it"
        if one
        else (f"{forgotten.turns:,} messages you wrote, and my replies to them")
    )
    places = "conversation" if forgotten.conversations == 1 else "conversations"
    return f"Done: I deleted {messages}, from {forgotten.conversations:,} {places}."


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
