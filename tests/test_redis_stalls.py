"""Writes to a real redis-server that stalls (SIGSTOP, then SIGCONT) or whose
connection breaks after it applied a command: a dedupe claim is never mistaken for
another process's, and a memory append is never stored twice."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from bot.messages import ConversationKey, Turn
from bot.store.dedupe import RedisDedupe
from bot.store.memory import RedisMemory
from tests.conftest import RedisServer

A = ConversationKey("slack", "C1", "1700000000.000100")


@contextmanager
def stalled(server: RedisServer) -> Iterator[None]:
    """redis-server paused: connections are accepted by the kernel, nothing answers."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


# The client's timeout, and a stall between one and two of them: long enough for a
# command to time out, short enough that a blind retry of it would be answered.
TIMEOUT = 1.0
STALL = 1.5


async def stall_during(server: RedisServer, call: Any, seconds: float = STALL) -> Any:
    """Run `call` while the server is paused for `seconds`, then let the server go on
    and wait for the call's outcome."""
    with stalled(server):
        task = asyncio.ensure_future(call)
        await asyncio.sleep(seconds)
    result = await task
    await asyncio.sleep(0.2)  # the server works through what it was sent meanwhile
    return result


WRITES = (b"\r\nEVAL\r\n", b"\r\nRPUSH\r\n", b"\r\nSET\r\n")


class BreaksAfterApplying(aioredis.Connection):
    """The first reply to a write is read, then the connection breaks, as when a
    connection drops between the server applying a command and the client hearing it."""

    broken = 0
    _last_was_write = False

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        response = await super().read_response(*args, **kwargs)
        if BreaksAfterApplying.broken == 0 and self._last_was_write:
            BreaksAfterApplying.broken += 1
            await self.disconnect()
            raise RedisConnectionError("connection reset after the reply was sent")
        return response

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        packed = b"".join(command) if isinstance(command, list) else bytes(command)
        self._last_was_write = any(w in packed[:64].upper() for w in WRITES)
        await super().send_packed_command(command, check_health)


async def test_a_claim_that_timed_out_during_a_stall_still_gets_an_answer(
    redis_server: RedisServer,
) -> None:
    here = RedisDedupe(redis_server.url, timeout=TIMEOUT)
    there = RedisDedupe(redis_server.url, timeout=TIMEOUT)
    await here.first("warm-up")  # connected before the stall
    claimed = await stall_during(redis_server, here.first("T1:1700000000.1"))
    # This replica answers; the server applied its claim, so another replica (or
    # Slack's retry) does not answer again.
    assert claimed is True
    assert await there.first("T1:1700000000.1") is False
    await here.close()
    await there.close()


async def test_a_claim_sent_again_after_a_broken_connection_recognises_itself(
    redis_server: RedisServer,
) -> None:
    BreaksAfterApplying.broken = 0
    dedupe = RedisDedupe(redis_server.url, connection_class=BreaksAfterApplying)
    assert await dedupe.first("T1:2.0") is True
    assert BreaksAfterApplying.broken == 1  # the command was applied, then sent again
    assert await dedupe.first("T1:2.0") is False
    await dedupe.close()


async def test_an_append_during_a_stall_is_stored_once(redis_server: RedisServer) -> None:
    memory = RedisMemory(redis_server.url, max_turns=20, ttl_seconds=600, timeout=TIMEOUT)
    await memory.append(A, [Turn("user", "u1"), Turn("assistant", "a1")])
    await stall_during(
        redis_server, memory.append(A, [Turn("user", "u2"), Turn("assistant", "a2")])
    )
    assert [t.content for t in await memory.history(A)] == ["u1", "a1", "u2", "a2"]
    await memory.close()


async def test_an_append_sent_again_after_a_broken_connection_is_stored_once(
    redis_server: RedisServer,
) -> None:
    BreaksAfterApplying.broken = 0
    memory = RedisMemory(
        redis_server.url, max_turns=20, ttl_seconds=600, connection_class=BreaksAfterApplying
    )
    await memory.append(A, [Turn("user", "u1"), Turn("assistant", "a1")])
    assert BreaksAfterApplying.broken == 1
    assert [t.content for t in await memory.history(A)] == ["u1", "a1"]
    await memory.close()


async def test_reads_during_a_stall_give_no_history_then_recover(
    redis_server: RedisServer,
) -> None:
    memory = RedisMemory(redis_server.url, max_turns=20, ttl_seconds=600, timeout=TIMEOUT)
    await memory.append(A, [Turn("user", "u1"), Turn("assistant", "a1")])
    assert await stall_during(redis_server, memory.history(A)) == []
    assert [t.content for t in await memory.history(A)] == ["u1", "a1"]
    await memory.close()
