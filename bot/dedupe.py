"""Answer each platform event once: Slack resends events it thinks were not
acknowledged, and several bot replicas may receive the same one.

With REDIS_URL, the first process to `SET key NX EX` wins, across replicas; without
it (or while Redis is unreachable), an in-process table does the same for this
process.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from bot.redis_client import REDIS_ERRORS, Outages, connect
from bot.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "chatbot:seen:"


class Dedupe(Protocol):
    async def first(self, key: str) -> bool:
        """True the first time `key` is seen (within the TTL), False after."""
        ...

    async def close(self) -> None: ...


class InProcessDedupe:
    def __init__(self, ttl_seconds: float = 600) -> None:
        self._ttl = ttl_seconds
        self._seen: dict[str, float] = {}

    async def first(self, key: str) -> bool:
        now = time.monotonic()
        if len(self._seen) > 10_000:  # bounded: drop what has expired
            self._seen = {k: t for k, t in self._seen.items() if now - t < self._ttl}
        seen = self._seen.get(key)
        if seen is not None and now - seen < self._ttl:
            return False
        self._seen[key] = now
        return True

    async def close(self) -> None:
        self._seen.clear()


class RedisDedupe:
    def __init__(self, url: str, ttl_seconds: int = 600, timeout: float = 2.0) -> None:
        self._ttl = ttl_seconds
        self._redis = connect(url, timeout)
        self._fallback = InProcessDedupe(ttl_seconds)
        self._outages = Outages(url, "deduping events in this process only")

    async def first(self, key: str) -> bool:
        try:
            claimed = await self._redis.set(KEY_PREFIX + key, "1", nx=True, ex=self._ttl)
        except REDIS_ERRORS as exc:
            self._outages.failed("dedupe an event", exc)
            return await self._fallback.first(key)
        self._outages.succeeded()
        return bool(claimed)

    async def close(self) -> None:
        await self._redis.aclose()


def open_dedupe(settings: Settings) -> Dedupe:
    if settings.redis_url is None:
        return InProcessDedupe()
    return RedisDedupe(settings.redis_url.get_secret_value())
