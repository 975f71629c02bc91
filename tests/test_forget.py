"""Forgetting a person: their turns and the replies to them go from every conversation
of the platform, nobody else's; in Redis and in-process, from the engine and the CLI."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from bot.engine import Engine
from bot.forgetting import describe
from bot.inference.loader import LoadedModel
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message, Turn
from bot.store.forgetting import Forgotten, forget_person
from bot.store.memory import InProcessMemory, Memory, RedisMemory
from bot.store.schema import redis_key, user_key
from tests.conftest import RedisClusterNodes, RedisServer, bot_env, greedy, run_bot, settle
from tests.scripted import ScriptedModel

GENERAL = ConversationKey("discord", "100")
THREAD = ConversationKey("discord", "100", "555")
OTHER = ConversationKey("discord", "200")
SLACK = ConversationKey("slack", "C1", "1.0")


def said(conversation: ConversationKey, who: str, text: str) -> Message:
    return Message(conversation, who, f"user{who}", text)


@pytest.fixture(params=["redis", "cluster", "in-process"])
async def memory(request: pytest.FixtureRequest) -> AsyncIterator[Memory]:
    store: Memory
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisMemory(server.url, 20, 600)
    elif request.param == "cluster":
        nodes: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        store = RedisMemory(nodes.url, 20, 600, cluster=True)
    else:
        store = InProcessMemory(20, 600)
    yield store
    await store.close()


async def chat(engine: Engine) -> None:
    """Alice (1) and Bob (2) talk in two channels and a thread; Alice on Slack too,
    with the same id (another platform: another person)."""
    for conversation, who, text in [
        (GENERAL, "1", "alice in general"),
        (GENERAL, "2", "bob in general"),
        (GENERAL, "1", "alice again"),
        (THREAD, "1", "alice in a thread"),
        (OTHER, "2", "bob elsewhere"),
        (OTHER, "1", "alice elsewhere"),
        (SLACK, "1", "alice on slack"),
    ]:
        await engine.reply(said(conversation, who, text))


def texts(turns: list[Turn]) -> list[str]:
    return [t.content for t in turns]


async def test_forgetting_removes_exactly_that_persons_turns(memory: Memory) -> None:
    engine = Engine(LocalBackend(ScriptedModel(lambda text: f"re: {text}")), memory)
    await chat(engine)
    forgotten = await engine.forget_user("discord", "1")
    assert forgotten == Forgotten(turns=4, conversations=3)
    assert texts(await memory.history(GENERAL)) == ["bob in general", "re: bob in general"]
    assert await memory.history(THREAD) == []
    assert texts(await memory.history(OTHER)) == ["bob elsewhere", "re: bob elsewhere"]
    # Another platform's person with the same id keeps theirs.
    assert texts(await memory.history(SLACK)) == ["alice on slack", "re: alice on slack"]
    assert await memory.conversations_of("discord", "1") == []
    # Once more: nothing left.
    assert await engine.forget_user("discord", "1") == Forgotten(0, 0)
    # Bob's memory goes on as before.
    await engine.reply(said(GENERAL, "2", "bob later"))
    assert len(await memory.history(GENERAL)) == 4


async def test_redis_keys_for_forgetting(redis_server: RedisServer) -> None:
    memory = RedisMemory(redis_server.url, 20, 600)
    engine = Engine(LocalBackend(ScriptedModel()), memory)
    await chat(engine)
    probe = aioredis.from_url(redis_server.url, decode_responses=True)
    key = user_key("discord", "1")
    assert key == "chatbot:user:{discord:1}"  # hash-tagged: one slot per person
    assert len(await probe.smembers(key)) == 3
    assert 0 < await probe.ttl(key) <= 600  # expires with the conversations
    before = await probe.ttl(redis_key(GENERAL))
    await engine.forget_user("discord", "1")
    assert await probe.exists(key) == 0
    assert 0 < await probe.ttl(redis_key(GENERAL)) <= before  # TTL kept
    assert await probe.exists(redis_key(THREAD)) == 0  # emptied: gone
    await probe.aclose()
    await engine.close()


async def test_a_reply_in_progress_is_not_kept_after_the_forget() -> None:
    memory = InProcessMemory(20, 600)
    engine = Engine(LocalBackend(ScriptedModel("a slow reply", chunk=1, delay=0.02)), memory)
    await engine.reply(said(GENERAL, "1", "an earlier message"))
    stream = engine.stream(said(OTHER, "1", "my first message here"))
    chunks = aiter(stream)
    await anext(chunks)  # generating now; nothing stored yet, no index lists OTHER
    forgetting = asyncio.create_task(engine.forget_user("discord", "1"))
    async for _ in chunks:
        pass
    # The reply in progress is deleted as it is stored (not counted: it was never kept).
    assert await forgetting == Forgotten(1, 1)
    assert await memory.history(OTHER) == []
    assert await memory.history(GENERAL) == []
    # What they write after the forget is kept.
    await engine.reply(said(OTHER, "1", "a new message"))
    assert [t.content for t in await memory.history(OTHER)] == ["a new message", "a slow reply"]
    await engine.close()


async def test_the_model_cache_of_a_conversation_goes_too(bundled: LoadedModel) -> None:
    generator = greedy(bundled, max_new_tokens=4)
    scheduler = generator.scheduler
    assert scheduler is not None
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
    await engine.reply(said(GENERAL, "1", "my secret is 4417"))
    await settle(engine)  # the cache is copied into the store off the worker thread
    assert scheduler.store.peek(str(GENERAL)) is not None
    await engine.forget_user("discord", "1")
    # Forgetting is done on the worker between steps: after another reply's, surely.
    await engine.reply(said(OTHER, "2", "hello"))
    await settle(engine)
    assert scheduler.store.take(str(GENERAL)) is None
    assert scheduler.store.take(str(OTHER)) is not None
    await engine.close()


def test_what_the_person_is_told() -> None:
    assert describe(Forgotten(0, 0)).startswith("Done: nothing you wrote is stored")
    assert describe(Forgotten(1, 1)) == (
        "Done: I deleted 1 message you wrote, and my reply to it, from 1 conversation."
    )
    assert describe(Forgotten(3, 2)) == (
        "Done: I deleted 3 messages you wrote, and my replies to them, from 2 conversations."
    )


async def test_the_command_line(redis_server: RedisServer) -> None:
    memory = RedisMemory(redis_server.url, 20, 600)
    engine = Engine(LocalBackend(ScriptedModel()), memory)
    await chat(engine)
    done = await asyncio.to_thread(
        run_bot,
        "forget",
        "--platform",
        "discord",
        "--user",
        "1",
        env=bot_env(REDIS_URL=redis_server.url),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Deleted 4 turn(s) by discord user 1" in done.stdout
    assert "3 conversation(s)" in done.stdout
    assert texts(await memory.history(GENERAL)) == ["bob in general", "Scripted reply."]
    # Redis failing mid-way (here a key of the wrong type): one line, exit 1.
    probe = aioredis.from_url(redis_server.url, decode_responses=True)
    await probe.set(user_key("discord", "2"), "not a set")
    await probe.aclose()
    failed = await asyncio.to_thread(
        run_bot,
        *("forget", "--platform", "discord", "--user", "2"),
        env=bot_env(REDIS_URL=redis_server.url),
        timeout=60,
    )
    assert failed.returncode == 1 and "Could not finish" in failed.stderr
    assert "Traceback" not in failed.stderr
    # Without Redis there is nothing outside a running bot to delete: said, exit 2.
    missing = await asyncio.to_thread(
        run_bot, "forget", "--platform", "discord", "--user", "1", env=bot_env(), timeout=60
    )
    assert missing.returncode == 2 and "REDIS_URL" in missing.stderr
    assert "Traceback" not in missing.stderr
    await engine.close()


async def test_someone_who_stopped_talking_is_still_found(redis_server: RedisServer) -> None:
    """Their list of conversations lives as long as a conversation holding their turns:
    renewed whenever anyone writes there, not only when they do."""
    memory = RedisMemory(redis_server.url, 20, 600)
    engine = Engine(LocalBackend(ScriptedModel()), memory)
    probe = aioredis.from_url(redis_server.url, decode_responses=True)
    await engine.reply(said(GENERAL, "1", "alice, once"))
    await probe.expire(user_key("discord", "1"), 1)  # about to expire, as after days
    await engine.reply(said(GENERAL, "2", "bob keeps talking"))
    assert await probe.ttl(user_key("discord", "1")) > 100
    assert await engine.forget_user("discord", "1") == Forgotten(1, 1)
    await probe.aclose()
    await engine.close()


async def test_a_message_stored_while_forgetting_is_found_next_time(
    redis_server: RedisServer,
) -> None:
    """A turn stored elsewhere while a /forget runs (another replica, a quick message)
    stays findable: forgetting unlists each conversation as it goes, never the whole list."""
    memory = RedisMemory(redis_server.url, 20, 600)
    engine = Engine(LocalBackend(ScriptedModel()), memory)
    await chat(engine)
    meanwhile = ConversationKey("discord", "300")

    @asynccontextmanager
    async def hold(conversation: ConversationKey) -> AsyncIterator[None]:
        if conversation == GENERAL:  # the first one: Alice, writing after her /forget
            said_now = Turn("user", "alice meanwhile", "1", "Alice", sent_at=time.time())
            await memory.append(meanwhile, [said_now, Turn("assistant", "ok")])
        yield

    first = await forget_person(memory, "discord", "1", hold=hold)
    assert first == Forgotten(4, 3)
    assert await memory.conversations_of("discord", "1") == [meanwhile]
    assert await engine.forget_user("discord", "1") == Forgotten(1, 1)
    assert await memory.history(meanwhile) == []
    await engine.close()


async def test_forget_drops_the_model_cache_even_when_memory_had_nothing_left(
    redis_server: RedisServer,
) -> None:
    """Alice's turns were trimmed from memory by later ones, but a model cache of the
    conversation may still hold them: it is dropped all the same."""
    dropped: list[str] = []

    class Watched(LocalBackend):
        def forget(self, conversation: str) -> None:
            dropped.append(conversation)
            super().forget(conversation)

    memory = RedisMemory(redis_server.url, 2, 600)  # one exchange kept
    engine = Engine(Watched(ScriptedModel()), memory)
    await engine.reply(said(GENERAL, "1", "alice's secret"))
    await engine.reply(said(GENERAL, "2", "bob pushes it out"))
    forgotten = await engine.forget_user("discord", "1")
    assert forgotten.turns == 0
    assert dropped == [str(GENERAL)]
    await engine.close()


def test_a_prefix_cache_expires_when_idle() -> None:
    """Unit: an entry unused for idle_seconds goes; a get renews it."""
    import torch

    from bot.inference.kvcache import Prefix, PrefixStore

    now = [0.0]
    store = PrefixStore(1 << 20, idle_seconds=10, clock=lambda: now[0])
    store.put("a", Prefix([1, 2], torch.zeros(2, 1, 1, 2, 4)))
    store.put("b", Prefix([3], torch.zeros(2, 1, 1, 1, 4)))
    now[0] = 8
    assert store.get("a") is not None  # used again: due at 18
    now[0] = 11
    assert store.expire() == pytest.approx(7)
    assert store.peek("b") is None and store.peek("a") is not None
    now[0] = 18
    assert store.expire() is None and len(store) == 0 and store.nbytes == 0


async def test_an_idle_conversations_model_cache_goes_after_the_memory_ttl(
    bundled: LoadedModel,
) -> None:
    """A cache holds people's words: with nothing else running, the worker drops it once
    MEMORY_TTL_SECONDS have passed unused, as memory forgets the conversation."""
    generator = greedy(bundled, max_new_tokens=4, memory_ttl_seconds=1)
    scheduler = generator.scheduler
    assert scheduler is not None
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 1))
    await engine.reply(said(GENERAL, "1", "my secret is 4417"))
    for _ in range(100):  # copied into the store off the worker thread, at once
        if scheduler.store.peek(str(GENERAL)) is not None:
            break
        await asyncio.sleep(0.005)
    assert scheduler.store.peek(str(GENERAL)) is not None
    for _ in range(400):  # the system prompt's shared cache too (put a moment later)
        if len(scheduler.store) == 0:
            break
        await asyncio.sleep(0.01)
    assert scheduler.store.peek(str(GENERAL)) is None
    assert len(scheduler.store) == 0 and scheduler.store.nbytes == 0
    await engine.close()
