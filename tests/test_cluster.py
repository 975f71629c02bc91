"""Memory, personas, dedupe claims, locks, /forget and the forget CLI on a real
3-master Redis Cluster, reached through REDIS_URL naming one of its nodes (the memory
suite itself runs on it too: tests/test_memory.py, tests/test_forget.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from bot.engine import Engine
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message
from bot.settings import ConfigError
from bot.store.connection import connect
from bot.store.dedupe import RedisDedupe
from bot.store.memory import RedisMemory, open_memory
from bot.store.schema import redis_key
from tests.conftest import RedisClusterNodes, RedisServer, bot_env, make_settings, run_bot
from tests.scripted import ScriptedModel


def conversations(count: int) -> list[ConversationKey]:
    """Channels and threads whose keys hash to slots on every node."""
    keys = [ConversationKey("discord", str(1000 + i)) for i in range(count // 2)]
    return keys + [
        ConversationKey("slack", f"C{i}", f"17000000{i}.0001") for i in range(count // 2)
    ]


async def test_the_bot_stores_every_conversation_on_a_cluster(
    redis_cluster: RedisClusterNodes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(redis_url=redis_cluster.url)
    memory = await open_memory(settings)
    assert isinstance(memory, RedisMemory)
    assert any("Redis Cluster at" in r.getMessage() for r in caplog.records)
    engine = Engine(LocalBackend(ScriptedModel(lambda text: f"re: {text}")), memory)
    keys = conversations(40)
    replies = await asyncio.gather(
        *(engine.reply(Message(key, "7", "Ann", f"hello {key}")) for key in keys)
    )
    assert all(r.ok for r in replies)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    for key in keys:
        assert [t.content for t in await memory.history(key)] == [
            f"hello {key}",
            f"re: hello {key}",
        ]
    # The keys really are spread over the three nodes (each script kept to one slot).
    probe = connect(redis_cluster.url, cluster=True)
    assert isinstance(probe, RedisCluster)
    await probe.initialize()
    nodes = {str(probe.get_node_from_key(redis_key(key))) for key in keys}
    assert len(nodes) == 3
    await probe.aclose()

    await engine.set_persona(keys[0], "You are a pirate.")
    assert await engine.persona(keys[0]) == "You are a pirate."
    forgotten = await engine.forget_user("discord", "7")
    assert (forgotten.turns, forgotten.conversations) == (20, 20)
    assert all([await memory.history(key) for key in keys[20:]])  # Slack's stay
    assert not any([await memory.history(key) for key in keys[:20]])
    await engine.reset(keys[20])
    assert await memory.history(keys[20]) == []
    await engine.close()


async def test_dedupe_claims_on_a_cluster(redis_cluster: RedisClusterNodes) -> None:
    one, two = RedisDedupe(redis_cluster.url), RedisDedupe(redis_cluster.url)
    events = [f"C{i}:{i}.0" for i in range(30)]
    assert [await one.first(e) for e in events] == [True] * 30
    assert [await two.first(e) for e in events] == [False] * 30
    await one.close()
    await two.close()


async def test_the_forget_cli_on_a_cluster(redis_cluster: RedisClusterNodes) -> None:
    memory = RedisMemory(redis_cluster.url, 20, 600, cluster=True)
    engine = Engine(LocalBackend(ScriptedModel()), memory)
    for key in conversations(10):
        await engine.reply(Message(key, "7", "Ann", "hi"))
    done = await asyncio.to_thread(
        run_bot,
        *("forget", "--platform", "slack", "--user", "7"),
        env=bot_env(REDIS_URL=redis_cluster.url),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Deleted 5 turn(s) by slack user 7" in done.stdout
    assert all([await memory.history(key) for key in conversations(10)[:5]])
    await engine.close()


async def test_a_redis_user_without_info_starts_as_one_server(
    redis_server: RedisServer,
) -> None:
    """A least-privilege ACL (no @dangerous, so no INFO): start-up takes the server as
    one server and memory works, as before the cluster probe."""
    admin = connect(redis_server.url)
    await admin.execute_command(
        "ACL", "SETUSER", "bot", "on", ">s3cret-pass", "~chatbot:*", "+@all", "-@dangerous"
    )
    await admin.aclose()
    url = f"redis://bot:s3cret-pass@127.0.0.1:{redis_server.port}/0"
    memory = await open_memory(make_settings(redis_url=url))
    key = ConversationKey("discord", "1")
    engine = Engine(LocalBackend(ScriptedModel("ok")), memory)
    assert (await engine.reply(Message(key, "7", "Ann", "hi"))).ok
    assert [t.content for t in await memory.history(key)] == ["hi", "ok"]
    await engine.close()


async def test_a_read_only_replica_as_redis_url_is_refused_at_start(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    replica = RedisServer(tmp_path)
    replica.start()
    probe = connect(replica.url)
    await probe.execute_command("REPLICAOF", "127.0.0.1", str(redis_server.port))
    await probe.aclose()
    with pytest.raises(ConfigError, match="read-only replica"):
        await open_memory(make_settings(redis_url=replica.url))
    replica.stop()


async def test_readiness_on_a_cluster_asks_for_every_slot(redis_cluster: RedisClusterNodes) -> None:
    memory = RedisMemory(redis_cluster.url, 20, 600, cluster=True)
    assert await memory.ready()
    await memory.close()
