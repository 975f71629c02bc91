"""Forgetting a person, in the store: their turns, and the replies to them, taken out
of every conversation that lists them (`Engine.forget_user` and the operators' CLI).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass

from bot.messages import ConversationKey
from bot.store.memory import Memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Forgotten:
    """How much of one person went: their turns and the conversations they were in."""

    turns: int
    conversations: int


async def forget_person(
    memory: Memory,
    platform: str,
    user_id: str,
    *,
    also: Iterable[ConversationKey] = (),
    hold: Callable[[ConversationKey], AbstractAsyncContextManager[None]] | None = None,
    drop_cache: Callable[[str], None] | None = None,
) -> Forgotten:
    """Remove the person's turns sent until now, and the replies to them, everywhere on
    `platform`, also those still being answered (downloading files, queued, generating).

    Each conversation is done in its turn (`hold`: this process's order; the store's
    lock: other processes'), so a reply being written there is stored first, then
    deleted with the rest. `also`: conversations where the person's message is being
    answered now and may not be listed yet. `drop_cache`: forget a conversation's
    model cache.
    """
    # The mark first: a message of theirs sent before now and stored after the lists are
    # read is deleted as it is stored, on whichever process answers it.
    at = time.time()
    await memory.mark_forgotten(platform, user_id, at)
    listed = await memory.conversations_of(platform, user_id)
    turns = touched = 0
    for conversation in sorted({*listed, *also}, key=str):
        async with (hold or _no_hold)(conversation), memory.turn(conversation):
            # Everything of theirs stored: not only what was sent before the mark by
            # this clock (another replica's, or the CLI's, may run behind).
            removed = await memory.forget(conversation, user_id)
        if removed:
            turns += removed
            touched += 1
        if drop_cache is not None:
            # Whatever the count: their turns may have gone from memory (trimmed,
            # expired) and still be in a model cache.
            drop_cache(str(conversation))
    log.info("Forgot %d turn(s) of a %s user in %d conversation(s)", turns, platform, touched)
    return Forgotten(turns, touched)


def _no_hold(_conversation: ConversationKey) -> AbstractAsyncContextManager[None]:
    return nullcontext()
