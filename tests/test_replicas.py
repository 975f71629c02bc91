"""Several processes on one Redis (replicas behind a load balancer, and the forget CLI):
a /forget that misses no message in flight, locks that hold through a failed renewal
and fence the writes of a process that lost one, and /reset after a reply elsewhere."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from redis.asyncio.lock import Lock

from bot.engine import Engine
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message, Turn
from bot.store import memory as memory_module
from bot.store.connection import connect
from bot.store.forgetting import forget_person
from bot.store.memory import InProcessMemory, Memory, RedisMemory
from bot.store.schema import lock_key
from tests.conftest import RedisTarget
from tests.scripted import ScriptedModel

KEY = ConversationKey("discord", "100")
OTHER = ConversationKey("discord", "200")


class Watched(LocalBackend):
    """Records the conversations whose model cache is dropped."""

    dropped: list[str]

    def forget(self, conversation: str) -> None:
        self.dropped.append(conversation)
        super().forget(conversation)


def engine_on(memory: Memory, reply: str = "ok") -> tuple[Engine, Watched]:
    backend = Watched(ScriptedModel(reply, chunk=2, delay=0.01))
    backend.dropped = []
    return Engine(backend, memory), backend


def sent_now(conversation: ConversationKey, who: str, text: str) -> Message:
    """A message as an adapter builds it: its time is when the platform got it, before
    any file of it is downloaded."""
    return Message(conversation, who, f"user{who}", text, timestamp=datetime.now(UTC))


def stores(target: RedisTarget) -> tuple[RedisMemory, RedisMemory]:
    return (
        RedisMemory(target.url, 20, 600, cluster=target.cluster),
        RedisMemory(target.url, 20, 600, cluster=target.cluster),
    )


# --- finding 1: /forget and a message still being prepared --------------------------------


@pytest.mark.parametrize("where", ["one engine", "two engines on one Redis", "the CLI"])
async def test_a_message_sent_before_forget_is_never_stored_after_it(
    where: str, redis_target: RedisTarget
) -> None:
    """The message arrives, its attachment downloads (slowly) while the person's
    /forget runs somewhere, and only then is it answered: it is not kept, nor is the
    answering process's model cache of it."""
    here, there = stores(redis_target)
    answering, backend = engine_on(here)
    await answering.reply(sent_now(OTHER, "1", "an earlier message"))
    message = sent_now(KEY, "1", "Attached file notes.txt: my address is 1 Main St")
    await asyncio.sleep(0.01)  # ... the download ...
    if where == "one engine":
        forgotten = await answering.forget_user("discord", "1")
    elif where == "two engines on one Redis":
        forgotten = await engine_on(there)[0].forget_user("discord", "1")
    else:
        forgotten = await forget_person(there, "discord", "1")
    assert forgotten.turns == 1  # the earlier message; the new one is not stored yet
    reply = await answering.reply(message)
    assert reply.ok and reply.text == "ok"  # the person still gets their answer
    assert await here.history(KEY) == [] and await here.history(OTHER) == []
    assert str(KEY) in backend.dropped
    # What they say after the forget is kept as usual, on any replica.
    later = sent_now(KEY, "1", "hello again")
    assert (await answering.reply(later)).ok
    assert [t.content for t in await there.history(KEY)] == ["hello again", "ok"]
    await answering.close()
    await there.close()


async def test_in_process_a_message_sent_before_forget_is_not_kept() -> None:
    memory = InProcessMemory(20, 600)
    engine, backend = engine_on(memory)
    message = sent_now(KEY, "1", "my secret is 4417")
    await asyncio.sleep(0.01)
    await engine.forget_user("discord", "1")
    assert (await engine.reply(message)).ok
    assert await memory.history(KEY) == []
    assert str(KEY) in backend.dropped
    await engine.close()


async def test_forget_takes_only_what_was_sent_before_it(redis_target: RedisTarget) -> None:
    """Turns stored with their time: one sent after the mark stays, and a turn stored
    by older code (no time) goes, as before."""
    memory = RedisMemory(redis_target.url, 20, 600, cluster=redis_target.cluster)
    now = time.time()
    await memory.append(KEY, [Turn("user", "old code", "1", "A"), Turn("assistant", "a")])
    await memory.append(
        KEY, [Turn("user", "before", "1", "A", sent_at=now - 5), Turn("assistant", "b")]
    )
    await memory.append(
        KEY, [Turn("user", "after", "1", "A", sent_at=now + 5), Turn("assistant", "c")]
    )
    assert await memory.forget(KEY, "1", before=now) == 2
    assert [t.content for t in await memory.history(KEY)] == ["after", "c"]
    await memory.close()


# --- finding 2: a failed renewal, and fencing --------------------------------------------


async def test_a_renewal_that_fails_once_keeps_the_lock(
    redis_target: RedisTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the lock's life scaled to 1.5 s and one renewal raising a socket timeout,
    a second replica still waits for the first one's reply to end."""
    monkeypatch.setattr(memory_module, "LOCK_SECONDS", 1.5)
    monkeypatch.setattr(memory_module, "RENEW_RETRY_SECONDS", 0.1)
    reacquire = Lock.reacquire
    failures = [TimeoutError("Timeout reading from socket")]

    async def flaky(self: Lock) -> bool:
        if failures:
            raise failures.pop()
        return await reacquire(self)

    monkeypatch.setattr(Lock, "reacquire", flaky)
    one, two = stores(redis_target)
    released = taken = 0.0

    async def first() -> None:
        nonlocal released
        async with one.turn(KEY):
            await asyncio.sleep(4)  # a long reply: past two of the lock's lives
            assert await one.append(KEY, [Turn("user", "one", "1"), Turn("assistant", "a")])
            released = time.monotonic()

    async def second() -> None:
        nonlocal taken
        await asyncio.sleep(0.2)
        async with two.turn(KEY):
            taken = time.monotonic()
            assert await two.append(KEY, [Turn("user", "two", "2"), Turn("assistant", "b")])

    await asyncio.gather(first(), second())
    assert not failures, "the renewal did fail once"
    assert taken >= released, "the second replica took the lock while the first held it"
    assert [t.content for t in await one.history(KEY)] == ["one", "a", "two", "b"]
    await one.close()
    await two.close()


async def test_a_process_that_lost_its_lock_writes_nothing(
    redis_target: RedisTarget, caplog: pytest.LogCaptureFixture
) -> None:
    """Replica A stalls past its lock's life (here: the lock's key expires under it);
    B takes the lock and answers. A's late append and reset are refused by the script
    that would write them, and logged; B's exchange stays, in order."""
    one, two = stores(redis_target)
    probe = connect(redis_target.url, cluster=redis_target.cluster)
    async with one.turn(KEY):
        await probe.delete(lock_key(KEY))  # expired while A was stalled
        async with two.turn(KEY):
            assert await two.append(KEY, [Turn("user", "two", "2"), Turn("assistant", "b")])
            assert not await one.append(KEY, [Turn("user", "one", "1"), Turn("assistant", "a")])
            await one.reset(KEY)
    assert [t.content for t in await two.history(KEY)] == ["two", "b"]
    assert "no longer holds its lock" in caplog.text
    # Unlocked writes (no lock taken: Redis was away when it was asked) still go through.
    assert await one.append(OTHER, [Turn("user", "x", "1"), Turn("assistant", "y")])
    await probe.aclose()
    await one.close()
    await two.close()


# --- finding 5: /reset and a reply finishing on another replica --------------------------


async def test_reset_waits_for_a_reply_finishing_on_another_replica(
    redis_target: RedisTarget,
) -> None:
    here, there = stores(redis_target)
    writer, _ = engine_on(here, "a long answer " * 20)
    resetter, _ = engine_on(there)
    await writer.reply(sent_now(KEY, "1", "first"))
    stream = writer.stream(sent_now(KEY, "1", "second"))
    chunks = aiter(stream)
    await anext(chunks)  # replica A is writing its reply now
    resetting = asyncio.create_task(resetter.reset(KEY))
    await asyncio.sleep(0.05)
    assert not resetting.done(), "the reset waits for the reply in progress"
    async for _ in chunks:
        pass
    await resetting
    assert await there.history(KEY) == []
    await writer.close()
    await resetter.close()
