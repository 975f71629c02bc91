"""Replies in progress, shared by the adapters: on SIGTERM an adapter stops taking
messages and lets these finish, up to SHUTDOWN_GRACE_SECONDS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self, platform: str, grace: float) -> None:
        self.platform = platform
        self.grace = grace
        self.accepting = True
        self._tasks: set[asyncio.Task[object]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def track(self, work: Awaitable[object]) -> None:
        """Await `work` (a reply being written) as part of the current task, counted."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await work
        finally:
            self._tasks.discard(task)

    async def drain(self) -> None:
        """Stop accepting, then wait (bounded) for the replies in progress."""
        self.accepting = False
        if not self._tasks:
            return
        log.info("%s: stopping; finishing %d reply(ies) in flight", self.platform, len(self))
        _, late = await asyncio.wait(self._tasks, timeout=self.grace)
        if late:
            log.warning("%s: %d reply(ies) cut short at shutdown", self.platform, len(late))
