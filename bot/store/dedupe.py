"""Answer each platform event once: Slack resends events it thinks were not
acknowledged, and several bot replicas may receive the same one.

With REDIS_URL, the first process to claim the key wins, across replicas; without
it (or while Redis is unreachable), an in-process table does the same for this
process. A claim stores a token unique to it, so a claim that is sent again (a
connection broken after the server applied it) recognises itself instead of
concluding that another process answered.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis

from bot.settings import Settings
from bot.store.connection import REDIS_ERRORS, Client, Outages, connect, is_cluster

log = logging.getLogger(__name__)

KEY_PREFIX = "chatbot:seen:"

# The key's token if it has one, else set it to ours: one atomic step, on any Redis
# version (SET NX GET needs 7.0).
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
"""


class Dedupe(Protocol):
    async def first(self, key: str) -> bool:
        """True the first time `key` is seen (within the TTL), False after."""
        ...

    async def close(self) -> None: ...


class InProcessDedupe:
    """Keys seen within the TTL, oldest first: expired ones are dropped from the front
    on every call, so the table holds at most the TTL's worth of events."""

    def __init__(
        self, ttl_seconds: float = 600, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    async def first(self, key: str) -> bool:
        now = self._clock()
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if now - seen_at < self._ttl:
                break
            del self._seen[oldest]
        if key in self._seen:
            return False
        self._seen[key] = now
        return True

    async def close(self) -> None:
        self._seen.clear()


class RedisDedupe:
    """Claims in Redis, on one server or a Redis Cluster: which one is asked at the
    first claim (the adapters build this before anything can await), and again after
    a failed ask, so a Redis that is down at start-up is found later."""

    def __init__(
        self,
        url: str,
        ttl_seconds: int = 600,
        timeout: float = 2.0,
        connection_class: type[aioredis.Connection] | None = None,
        cluster: bool | None = None,
    ) -> None:
        """`cluster`: None asks the server at the first claim."""
        self._url = url
        self._cluster = cluster
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._connection_class = connection_class
        self._redis: Client | None = None
        self._fallback = InProcessDedupe(ttl_seconds)
        self._outages = Outages(url, "deduping events in this process only")

    async def _client(self) -> Client:
        if self._redis is None:
            cluster = await is_cluster(self._url, self._timeout, self._cluster)
            self._redis = connect(self._url, self._timeout, self._connection_class, cluster=cluster)
        return self._redis

    async def first(self, key: str) -> bool:
        token = uuid.uuid4().hex
        try:
            redis = await self._client()
            holder = await redis.eval(CLAIM, 1, KEY_PREFIX + key, token, self._ttl)
        except REDIS_ERRORS as exc:
            self._outages.failed("dedupe an event", exc)
            return await self._fallback.first(key)
        self._outages.succeeded()
        return bool(holder == token)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def open_dedupe(settings: Settings) -> Dedupe:
    if settings.redis_url is None:
        return InProcessDedupe()
    return RedisDedupe(settings.redis_url.get_secret_value(), cluster=settings.redis_cluster)
