"""Conversation memory on a real redis-server, and the in-process store beside it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from bot.engine import Engine
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message, Turn
from bot.store.connection import connect
from bot.store.memory import InProcessMemory, Memory, RedisMemory
from bot.store.schema import lock_key, redis_key
from tests.conftest import RedisClusterNodes, RedisServer, RedisTarget
from tests.scripted import ScriptedModel

A = ConversationKey("discord", "111")
B = ConversationKey("slack", "C1", "1700000000.000100")


class CountingConnection(aioredis.Connection):
    """Counts writes to the socket: one per round trip (a pipeline is one write)."""

    sends = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        await super().send_packed_command(command, check_health)


def turns(*texts: str) -> list[Turn]:
    return [Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


@pytest.fixture(params=["redis", "cluster", "in-process"])
async def memory(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Memory]:
    if request.param == "in-process":
        store: Memory = InProcessMemory(max_turns=4, ttl_seconds=3600)
        yield store
        return
    if request.param == "cluster":
        nodes: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        store = RedisMemory(nodes.url, max_turns=4, ttl_seconds=3600, cluster=True)
        yield store
        await store.close()
        return
    server = RedisServer(tmp_path)
    server.start()
    store = RedisMemory(server.url, max_turns=4, ttl_seconds=3600)
    yield store
    await store.close()
    server.stop()


async def test_round_trip_order_cap_and_reset(memory: Memory) -> None:
    assert await memory.history(A) == []
    await memory.append(A, turns("one", "two"))
    await memory.append(A, turns("three", "four"))
    await memory.append(B, turns("other"))
    assert [t.content for t in await memory.history(A)] == ["one", "two", "three", "four"]
    await memory.append(A, turns("five", "six"))
    # Capped at 4 turns: the oldest go.
    assert [t.content for t in await memory.history(A)] == ["three", "four", "five", "six"]
    assert [t.role for t in await memory.history(A)] == ["user", "assistant"] * 2
    await memory.reset(A)
    assert await memory.history(A) == []
    assert [t.content for t in await memory.history(B)] == ["other"]


async def test_unicode_and_hostile_text_round_trips(memory: Memory) -> None:
    text = 'emoji 👩‍👩‍👧 rtl \u202e "quotes" {json} \\ back\nline <@123> @everyone'
    await memory.append(A, [Turn("user", text)])
    assert (await memory.history(A))[0].content == text


async def test_in_process_ttl_expires() -> None:
    memory = InProcessMemory(max_turns=4, ttl_seconds=0.05)
    await memory.append(A, turns("hello"))
    await asyncio.sleep(0.1)
    assert await memory.history(A) == []


async def test_redis_schema_ttl_and_round_trips(redis_server: RedisServer) -> None:
    memory = RedisMemory(
        redis_server.url, max_turns=4, ttl_seconds=600, connection_class=CountingConnection
    )
    probe = aioredis.from_url(redis_server.url, decode_responses=True)
    try:
        await memory.history(A)  # connect once, so the count below is per operation
        CountingConnection.sends = 0
        await memory.append(A, turns("u", "a"))
        assert CountingConnection.sends == 1, "append + trim + expire must be one round trip"
        CountingConnection.sends = 0
        await memory.history(A)
        assert CountingConnection.sends == 1
        assert redis_key(A) == "chatbot:conv:{discord:111}"
        assert redis_key(B) == "chatbot:conv:{slack:C1}:1700000000.000100"
        assert 0 < await probe.ttl(redis_key(A)) <= 600
        assert await probe.lrange(redis_key(A), 0, -1) == [
            '{"role": "user", "content": "u"}',
            '{"role": "assistant", "content": "a"}',
        ]
        # An element this code did not write is skipped, not a crash.
        await probe.rpush(redis_key(A), "not json", '{"role": "system", "content": "x"}')
        assert [t.content for t in await memory.history(A)] == ["u", "a"]
    finally:
        await probe.aclose()
        await memory.close()


async def test_memory_survives_a_bot_restart(redis_target: RedisTarget) -> None:
    url, cluster = redis_target.url, redis_target.cluster
    first = RedisMemory(url, max_turns=10, ttl_seconds=600, cluster=cluster)
    await first.append(A, turns("remember me"))
    await first.close()
    second = RedisMemory(url, max_turns=10, ttl_seconds=600, cluster=cluster)
    assert [t.content for t in await second.history(A)] == ["remember me"]
    await second.close()


async def test_redis_outage_one_warning_then_resumes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    memory = RedisMemory(redis_server.url, max_turns=10, ttl_seconds=600, timeout=0.5)
    caplog.set_level(logging.INFO, logger="bot.store.connection")
    await memory.append(A, turns("before"))
    redis_server.stop()
    for _ in range(3):
        assert await memory.history(A) == []
        await memory.append(A, turns("lost"))  # dropped, no exception
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert redis_server.url in warnings[0].getMessage()
    redis_server.start()
    await memory.append(A, turns("after"))
    assert [t.content for t in await memory.history(A)] == ["after"]
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    # A second outage warns again, once.
    redis_server.stop()
    await memory.history(A)
    await memory.history(A)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2
    await memory.close()


@pytest.mark.parametrize("store", ["redis", "in-process"])
async def test_an_odd_cap_keeps_whole_exchanges(store: str, tmp_path: Any) -> None:
    server = RedisServer(tmp_path)
    if store == "redis":
        server.start()
    memory: Memory = (
        RedisMemory(server.url, max_turns=5, ttl_seconds=600)
        if store == "redis"
        else InProcessMemory(max_turns=5, ttl_seconds=600)
    )
    try:
        for i in range(4):
            await memory.append(A, turns(f"u{i}", f"a{i}"))
        history = await memory.history(A)
        assert [t.content for t in history] == ["u2", "a2", "u3", "a3"]
        assert (await memory.load(A))[0] == history
    finally:
        await memory.close()
        server.stop()


async def test_history_stored_by_older_code_is_read_from_its_first_user_turn(
    redis_target: RedisTarget,
) -> None:
    probe = connect(redis_target.url, cluster=redis_target.cluster)
    await probe.rpush(
        redis_key(A),
        '{"role": "assistant", "content": "half"}',
        '{"role": "user", "content": "u"}',
        '{"role": "assistant", "content": "a"}',
    )
    memory = RedisMemory(redis_target.url, 20, 600, cluster=redis_target.cluster)
    assert [t.content for t in await memory.history(A)] == ["u", "a"]
    assert [t.content for t in (await memory.load(A))[0]] == ["u", "a"]
    await memory.close()
    await probe.aclose()


async def test_two_processes_answer_one_conversation_in_order(redis_target: RedisTarget) -> None:
    """Two engines on one Redis (replicas behind a load balancer): two quick messages in
    one thread are answered one after the other, the second with the first exchange in
    its history, and stored in order."""
    url, cluster = redis_target.url, redis_target.cluster
    models = [ScriptedModel(lambda text: f"answer to {text}", chunk=4, delay=0.02) for _ in "ab"]
    engines = [Engine(LocalBackend(m), RedisMemory(url, 20, 600, cluster=cluster)) for m in models]
    key = ConversationKey("slack", "C1", "1712345678.000100")
    first = asyncio.create_task(engines[0].reply(Message(key, "u1", "Ann", "one")))
    probe = connect(url, cluster=cluster)
    for _ in range(2000):  # until the first holds the lock, however loaded the machine
        if await probe.exists(lock_key(key)):
            break
        await asyncio.sleep(0.005)
    await probe.aclose()
    second = asyncio.create_task(engines[1].reply(Message(key, "u2", "Bob", "two")))
    assert (await first).ok and (await second).ok
    stored = await engines[0].memory.history(key)
    assert [t.content for t in stored] == ["one", "answer to one", "two", "answer to two"]
    assert [t.content for t in models[1].histories[0]] == ["one", "answer to one"]
    for engine in engines:
        await engine.close()
