"""Showing a reply while it is written: post its first part as soon as there is
text, then edit it (paced) as it grows, continuing in further messages past the
platform's length limit. Platform-neutral: adapters supply post, edit and retract.

The final render owns every message the reply posted: when the final text needs
fewer messages than were posted (a reply that failed part-way is replaced by the
apology), the extra ones are retracted, so none keeps text of the abandoned answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from bot.engine import ReplyStream

H = TypeVar("H")  # a platform's handle on a posted message


class EditPacer:
    """At most one edit per `interval` seconds per key (a channel, a message)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable) -> bool:
        last = self._last.get(key)
        return last is None or time.monotonic() - last >= self.interval

    async def wait(self, key: Hashable) -> None:
        last = self._last.get(key)
        if last is not None:
            await asyncio.sleep(max(0.0, last + self.interval - time.monotonic()))

    def mark(self, key: Hashable) -> None:
        now = time.monotonic()
        self._last[key] = now
        if len(self._last) > 1000:  # forget quiet keys, so the table stays small
            self._last = {k: t for k, t in self._last.items() if now - t < self.interval}


class GrowingReply(Generic[H]):
    """The platform messages of one reply, kept equal to `render(text)`."""

    def __init__(
        self,
        render: Callable[[str], list[str]],
        post: Callable[[int, str], Awaitable[H]],
        edit: Callable[[H, str], Awaitable[object]],
        pacer: EditPacer,
        pace_key: Callable[[H], Hashable],
        *,
        retract: Callable[[H], Awaitable[object]],
    ) -> None:
        self._render = render
        self._post = post
        self._edit = edit
        self._pacer = pacer
        self._pace_key = pace_key
        self._retract = retract
        self.posted: list[H] = []
        self.shown: list[str] = []

    async def show(self, text: str, *, final: bool = False) -> None:
        """Bring the messages up to `text`; between final calls, skip edits not yet due."""
        parts = self._render(text)
        for index, part in enumerate(parts):
            if index < len(self.posted):
                if self.shown[index] == part:
                    continue
                key = self._pace_key(self.posted[index])
                if not final and not self._pacer.due(key):
                    continue  # the final pass catches up
                await self._pacer.wait(key)
                self._pacer.mark(key)
                await self._edit(self.posted[index], part)
                self.shown[index] = part
            else:
                handle = await self._post(index, part)
                self._pacer.mark(self._pace_key(handle))  # first edit a full interval later
                self.posted.append(handle)
                self.shown.append(part)
        if final:
            while len(self.posted) > len(parts):
                await self._retract(self.posted[-1])
                self.posted.pop()
                self.shown.pop()


async def play(stream: ReplyStream, reply: GrowingReply[H]) -> str:
    """Show `stream` through `reply` as it arrives; returns the final text."""
    text = ""
    try:
        async for chunk in stream:
            text += chunk
            if text.strip():
                await reply.show(text)
    finally:
        await stream.aclose()
    outcome = stream.reply
    final = outcome.text if outcome else text
    if outcome is not None and (outcome.refused or outcome.silent):
        # Nothing for the conversation: a silent reply posts nothing, and a refusal
        # (a Regenerate too late, or not theirs) goes to the presser alone.
        return final
    await reply.show(final, final=True)
    return final
