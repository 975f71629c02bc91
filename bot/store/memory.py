"""Per-conversation memory: in Redis when REDIS_URL is set, else in this process.

The key schema and the stored turn's JSON are in `bot.store.schema`. A reply's turns are appended,
the list trimmed to MEMORY_MAX_TURNS and its TTL renewed by one script, and the sets
of the conversation's authors (the new turn's, and those of turns still in it) given
the conversation and the same TTL, in one round trip; the history
and the persona are read in one. The braces are Redis Cluster hash tags: a channel's
keys share a slot, so that read needs one node, and no command ever spans two slots.

Forgetting a person (/forget) reads their set, then for each listed conversation, under
its lock, takes it off the set and removes their turns and the replies to them.

An append is idempotent: it carries a token, remembered for a while under
``chatbot:append:{<platform>:<channel>}:<token>``, and a second run of the same append
(a command sent again after a broken connection) stores nothing.

While a message is answered, ``chatbot:lock:{<platform>:<channel>}[:<thread>]`` holds
the conversation's lock (redis-py's Lock: a token, a 30 s expiry renewed while held), so
processes sharing this Redis answer one message of a conversation at a time, in order.

History is whole exchanges: the cap is rounded down to an even number of turns, and a
history that starts with a reply (stored by older code) is read from its first user turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from bot.messages import ConversationKey, Turn
from bot.settings import ConfigError, Settings
from bot.store.connection import REDIS_ERRORS, Outages, connect
from bot.store.schema import (
    append_key,
    authors,
    decode_conversation,
    decode_turn,
    encode_conversation,
    encode_turn,
    from_first_user_turn,
    lock_key,
    persona_key,
    redis_key,
    user_key,
    whole_exchanges,
    without_author,
)

log = logging.getLogger(__name__)

# A conversation's lock lives this long unless renewed (so a dead process frees it
# soon), and a message waits at most this long for another process's reply.
LOCK_SECONDS = 30
LOCK_WAIT_SECONDS = 120
# How long an append's token is remembered: far longer than a command's retry.
APPEND_TOKEN_SECONDS = 600

# KEYS: the conversation, the append's token. ARGV: cap, TTL, token TTL, turns.
APPEND = """
if not redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV, 4))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: the conversation. ARGV: the author whose turns go. Removes each of their user
# turns and the reply that follows it, keeping the list's TTL; returns how many of
# their turns went.
FORGET = """
local raw = redis.call('LRANGE', KEYS[1], 0, -1)
local keep, removed, drop_reply = {}, 0, false
for _, item in ipairs(raw) do
  local ok, turn = pcall(cjson.decode, item)
  local role = ok and type(turn) == 'table' and turn['role'] or nil
  if role == 'user' and turn['author_id'] == ARGV[1] then
    removed = removed + 1
    drop_reply = true
  elseif role == 'assistant' and drop_reply then
    drop_reply = false
  else
    drop_reply = false
    keep[#keep + 1] = item
  end
end
if removed == 0 then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
for i = 1, #keep, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(keep, i, math.min(i + 999, #keep)))
end
if #keep > 0 and ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return removed
"""


async def _renew(lock: Lock) -> None:
    """Keep a held lock alive while its reply is written (a reply can outlast it)."""
    while True:
        await asyncio.sleep(LOCK_SECONDS / 3)
        try:
            await lock.reacquire()
        except (*REDIS_ERRORS, LockError) as exc:
            log.warning("A conversation lock could not be renewed: %s", type(exc).__name__)
            return


class Memory(Protocol):
    """What the engine needs from a conversation store."""

    async def history(self, conversation: ConversationKey) -> list[Turn]:
        """The stored turns, oldest first; empty when unknown or unavailable."""
        ...

    async def load(self, conversation: ConversationKey) -> tuple[list[Turn], str | None]:
        """The history and its channel's persona (None: the default), in one read."""
        ...

    async def set_persona(self, conversation: ConversationKey, text: str | None) -> None:
        """Store (or with None, clear) the persona of the conversation's channel."""
        ...

    async def append(
        self,
        conversation: ConversationKey,
        turns: Sequence[Turn],
        present: Collection[str] = (),
    ) -> None:
        """Store turns at the end, keeping at most the configured number. `present`:
        the authors of turns already there, whose lists of conversations are renewed
        with it (so that someone who stopped talking is still found by /forget)."""
        ...

    async def reset(self, conversation: ConversationKey) -> None:
        """Forget a conversation."""
        ...

    async def conversations_of(self, platform: str, user_id: str) -> list[ConversationKey]:
        """The conversations that may hold the person's turns. Raises when the store
        cannot answer (a forget must not report success it did not have)."""
        ...

    async def forget(self, conversation: ConversationKey, user_id: str) -> int:
        """Remove the person's turns, and the replies to them, from a conversation, and
        the conversation from their list (a turn stored later lists it again); how many
        of their turns went. Raises when the store cannot answer."""
        ...

    def turn(self, conversation: ConversationKey) -> AbstractAsyncContextManager[None]:
        """Held while one message of the conversation is answered, across every
        process that shares this store (one process orders its own messages)."""
        ...

    async def ready(self) -> bool:
        """Whether the store answers (for readiness checks)."""
        ...

    @property
    def max_turns(self) -> int:
        """The most turns a conversation keeps (whole exchanges)."""
        ...

    async def close(self) -> None: ...


class InProcessMemory:
    """A dict of bounded deques, with the same caps as Redis; lost on restart."""

    def __init__(self, max_turns: int, ttl_seconds: float) -> None:
        self._max_turns = whole_exchanges(max_turns)
        self._ttl = ttl_seconds
        self._store: dict[ConversationKey, tuple[float, deque[Turn]]] = {}
        self._personas: dict[str, str] = {}
        self._last_sweep = time.monotonic()

    @property
    def max_turns(self) -> int:
        return self._max_turns

    def _sweep(self, now: float) -> None:
        # Expire idle conversations at most once a minute, so the dict stays bounded.
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        for key in [k for k, (touched, _) in self._store.items() if now - touched > self._ttl]:
            del self._store[key]

    async def history(self, conversation: ConversationKey) -> list[Turn]:
        now = time.monotonic()
        self._sweep(now)
        entry = self._store.get(conversation)
        if entry is None or now - entry[0] > self._ttl:
            return []
        return from_first_user_turn(list(entry[1]))

    async def load(self, conversation: ConversationKey) -> tuple[list[Turn], str | None]:
        return await self.history(conversation), self._personas.get(persona_key(conversation))

    async def set_persona(self, conversation: ConversationKey, text: str | None) -> None:
        if text is None:
            self._personas.pop(persona_key(conversation), None)
        else:
            self._personas[persona_key(conversation)] = text

    async def append(
        self,
        conversation: ConversationKey,
        turns: Sequence[Turn],
        present: Collection[str] = (),
    ) -> None:
        now = time.monotonic()
        entry = self._store.get(conversation)
        stored = entry[1] if entry and now - entry[0] <= self._ttl else None
        if stored is None:
            stored = deque(maxlen=self._max_turns)
        stored.extend(turns)
        self._store[conversation] = (now, stored)

    async def reset(self, conversation: ConversationKey) -> None:
        self._store.pop(conversation, None)

    async def conversations_of(self, platform: str, user_id: str) -> list[ConversationKey]:
        return [
            key
            for key, (_, turns) in self._store.items()
            if key.platform == platform and user_id in authors(turns)
        ]

    async def forget(self, conversation: ConversationKey, user_id: str) -> int:
        entry = self._store.get(conversation)
        if entry is None:
            return 0
        kept, removed = without_author(entry[1], user_id)
        if removed:
            self._store[conversation] = (entry[0], deque(kept, maxlen=self._max_turns))
        return removed

    def turn(self, conversation: ConversationKey) -> AbstractAsyncContextManager[None]:
        return nullcontext()  # one process: the engine's own order suffices

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._store.clear()


class RedisMemory:
    """Conversation memory in Redis through redis.asyncio.

    While Redis is unreachable, reads return no history and writes are dropped, so
    replies go on without memory; one warning per outage, one line when it is back.
    """

    def __init__(
        self,
        url: str,
        max_turns: int,
        ttl_seconds: int,
        *,
        timeout: float = 2.0,
        connection_class: type[aioredis.Connection] | None = None,
    ) -> None:
        self._max_turns = whole_exchanges(max_turns)
        self._ttl = ttl_seconds
        self._redis = connect(url, timeout, connection_class)
        self._outages = Outages(url, "replying without memory")

    @property
    def max_turns(self) -> int:
        return self._max_turns

    async def check(self) -> None:
        """Ping Redis once; raise ConfigError (exit code 2) naming the masked URL if not."""
        try:
            await self._redis.ping()
        except REDIS_ERRORS as exc:
            raise ConfigError(
                f"Cannot reach Redis at {self._outages.masked_url} (REDIS_URL): "
                f"{type(exc).__name__}"
            ) from None

    async def history(self, conversation: ConversationKey) -> list[Turn]:
        try:
            raw = await self._redis.lrange(redis_key(conversation), 0, -1)
        except REDIS_ERRORS as exc:
            self._outages.failed("read history", exc)
            return []
        self._outages.succeeded()
        return from_first_user_turn([turn for turn in map(decode_turn, raw) if turn is not None])

    async def load(self, conversation: ConversationKey) -> tuple[list[Turn], str | None]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.lrange(redis_key(conversation), 0, -1)
                pipe.get(persona_key(conversation))
                raw, persona = await pipe.execute()
        except REDIS_ERRORS as exc:
            self._outages.failed("read history", exc)
            return [], None
        self._outages.succeeded()
        turns = [turn for turn in map(decode_turn, raw) if turn is not None]
        return from_first_user_turn(turns), persona

    async def set_persona(self, conversation: ConversationKey, text: str | None) -> None:
        key = persona_key(conversation)
        try:
            await (self._redis.delete(key) if text is None else self._redis.set(key, text))
        except REDIS_ERRORS as exc:
            self._outages.failed("store a persona", exc)
            raise
        self._outages.succeeded()

    async def append(
        self,
        conversation: ConversationKey,
        turns: Sequence[Turn],
        present: Collection[str] = (),
    ) -> None:
        if not turns:
            return
        token = append_key(conversation, uuid.uuid4().hex)
        try:
            # One round trip; the author's set is in another slot, so not in the script.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.eval(
                    APPEND,
                    2,
                    redis_key(conversation),
                    token,
                    self._max_turns,
                    self._ttl,
                    APPEND_TOKEN_SECONDS,
                    *(encode_turn(t) for t in turns),
                )
                for author in sorted(authors(turns) | set(present)):
                    key = user_key(conversation.platform, author)
                    pipe.sadd(key, encode_conversation(conversation))
                    pipe.expire(key, self._ttl)
                await pipe.execute()
        except REDIS_ERRORS as exc:
            self._outages.failed("store turns", exc)
            return
        self._outages.succeeded()

    async def reset(self, conversation: ConversationKey) -> None:
        try:
            await self._redis.delete(redis_key(conversation))
        except REDIS_ERRORS as exc:
            self._outages.failed("reset a conversation", exc)
            return
        self._outages.succeeded()

    async def conversations_of(self, platform: str, user_id: str) -> list[ConversationKey]:
        raw = await self._redis.smembers(user_key(platform, user_id))
        found = {decode_conversation(item) for item in raw}
        return sorted((c for c in found if c is not None), key=str)

    async def forget(self, conversation: ConversationKey, user_id: str) -> int:
        # Unlisted first: an append after this (under the conversation's lock, so after
        # the script) lists the conversation again, and the next /forget finds it.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.srem(user_key(conversation.platform, user_id), encode_conversation(conversation))
            pipe.eval(FORGET, 1, redis_key(conversation), user_id)
            _, removed = await pipe.execute()
        return int(removed)

    @asynccontextmanager
    async def turn(self, conversation: ConversationKey) -> AsyncIterator[None]:
        """A Redis lock per conversation (redis-py's: a token, so only its holder
        releases it), renewed while held and expiring if its process dies. With
        replicas behind a load balancer, two quick messages in one thread are then
        answered one after the other, each with the other's exchange in its history.
        Redis unreachable, or a lock held past LOCK_WAIT_SECONDS: the reply goes on."""
        lock = self._redis.lock(
            lock_key(conversation),
            timeout=LOCK_SECONDS,
            sleep=0.05,
            blocking_timeout=LOCK_WAIT_SECONDS,
            thread_local=False,
        )
        try:
            held = bool(await lock.acquire())
            if not held:
                log.warning("Answering in %s without waiting longer for its lock", conversation)
        except REDIS_ERRORS as exc:
            self._outages.failed("order a conversation", exc)
            held = False
        renewal = asyncio.create_task(_renew(lock)) if held else None
        try:
            yield
        finally:
            if renewal is not None:
                renewal.cancel()
                with contextlib.suppress(*REDIS_ERRORS, LockError):
                    await lock.release()

    async def ready(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except REDIS_ERRORS:
            return False

    async def close(self) -> None:
        await self._redis.aclose()


async def open_memory(settings: Settings) -> Memory:
    """The configured store; with REDIS_URL, checked reachable (else ConfigError)."""
    if settings.redis_url is None:
        log.info(
            "REDIS_URL is not set: conversation memory is kept in this process "
            "and will not survive a restart"
        )
        return InProcessMemory(settings.memory_max_turns, settings.memory_ttl_seconds)
    memory = RedisMemory(
        settings.redis_url.get_secret_value(),
        settings.memory_max_turns,
        settings.memory_ttl_seconds,
    )
    try:
        await memory.check()
    except ConfigError:
        await memory.close()
        raise
    log.info("Conversation memory in Redis at %s", settings.redis_url_masked())
    return memory
