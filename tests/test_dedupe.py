"""One answer per event: Redis SET NX across replicas, in-process otherwise."""

from __future__ import annotations

import logging

import pytest

from bot.store.dedupe import InProcessDedupe, RedisDedupe
from tests.conftest import RedisServer


async def test_in_process() -> None:
    dedupe = InProcessDedupe(ttl_seconds=60)
    assert await dedupe.first("C1:1.0")
    assert not await dedupe.first("C1:1.0")
    assert await dedupe.first("C1:2.0")


async def test_redis_shared_between_replicas_and_outage_fallback(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = RedisDedupe(redis_server.url), RedisDedupe(redis_server.url, timeout=0.5)
    assert await one.first("C1:1.0")
    assert not await two.first("C1:1.0")  # another replica already claimed it
    redis_server.stop()
    assert await two.first("C1:2.0")  # unreachable: this process still dedupes
    assert not await two.first("C1:2.0")
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    await one.close()
    await two.close()
