"""What the local fakes of Discord and Slack share: an aiohttp server on a free
loopback port, a log of the calls the bot made, and waiting on that log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from aiohttp import web

C = TypeVar("C")


class FakeServer(Generic[C]):
    def __init__(self) -> None:
        self.calls: list[C] = []
        self.changed = asyncio.Condition()
        self.sockets: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self._runner:
            await self._runner.cleanup()

    async def record(self, call: C) -> None:
        async with self.changed:
            self.calls.append(call)
            self.changed.notify_all()

    def matching(self, predicate: Callable[[C], bool]) -> list[C]:
        return [c for c in self.calls if predicate(c)]

    async def wait_for(
        self, predicate: Callable[[C], bool], count: int = 1, within: float = 30
    ) -> list[C]:
        """Wait until `count` recorded calls satisfy `predicate`; returns them all."""

        async def enough() -> list[C]:
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.matching(predicate)) >= count)
                return self.matching(predicate)

        return await asyncio.wait_for(enough(), within)
