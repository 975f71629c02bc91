"""Per-conversation memory: in Redis when REDIS_URL is set, else in this process.

The key schema and the stored turn's JSON are in `bot.store.schema`. A reply's turns are appended,
the list trimmed to MEMORY_MAX_TURNS and its TTL renewed by one script, and the sets
of the conversation's authors (the new turn's, and those of turns still in it) given
the conversation and the same TTL, in one round trip; the history
and the persona are read in one. The braces are Redis Cluster hash tags: a channel's
keys share a slot, so that read needs one node, and no command ever spans two slots.

Forgetting a person (/forget) first marks the time in their slot, then reads their set
and, for each listed conversation under its lock, takes it off the set and removes
their stored turns and the replies to them. An append lists the
conversation in its authors' sets, writes the turns, and only then reads their marks
(one round trip on one server; under the conversation's lock on a cluster, which a
forget takes too): so either the forget finds the new turns or the append sees the
mark and deletes them itself. A message sent before a /forget is never kept after it,
whatever stage its reply was in, and on whichever process.

An append is idempotent: it carries a token, remembered for a while under
``chatbot:append:{<platform>:<channel>}:<token>``, and a second run of the same append
(a command sent again after a broken connection) stores nothing.

While a message is answered, ``chatbot:lock:{<platform>:<channel>}[:<thread>]`` holds
the conversation's lock (redis-py's Lock: a token, a 30 s expiry renewed while held, a
failed renewal retried until the lock would expire), so processes sharing this Redis
answer one message of a conversation at a time, in order. The lock fences: append and
reset check its token in the script that writes (the lock shares the conversation's
slot) and write nothing under a lock they no longer hold. A forget takes the lock too
(so a reply being written is stored first, then deleted with the rest) but is not
fenced: taking a person's turns out is right after any write, and never refused.

History is whole exchanges: the cap is rounded down to an even number of turns, and a
history that starts with a reply (stored by older code) is read from its first user turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.lock import Lock
from redis.exceptions import LockError

from bot.messages import ConversationKey, Turn
from bot.settings import ConfigError, Settings
from bot.store.connection import REDIS_ERRORS, Outages, connect, is_cluster, is_replica
from bot.store.schema import (
    append_key,
    authors,
    decode_conversation,
    decode_turn,
    encode_conversation,
    encode_turn,
    forgotten_by,
    forgotten_key,
    from_first_user_turn,
    lock_key,
    persona_key,
    redis_key,
    usage_key,
    user_key,
    vote_key,
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

# A failed renewal is tried again this often until the lock would have expired.
RENEW_RETRY_SECONDS = 1.0

# Each script's first lines: under a lock (its token in ARGV[1]; '' for none), write
# only while the lock's key still holds that token. KEYS[1]: the lock.
FENCE = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
"""

# KEYS: the lock, the conversation, the append's token. ARGV: lock token, cap, TTL,
# token TTL, turns. -1: the lock is lost; 0: already done; 1: stored.
APPEND = (
    FENCE
    + """
if not redis.call('SET', KEYS[3], 1, 'NX', 'EX', ARGV[4]) then return 0 end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 5))
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
)

# KEYS: the lock, the conversation. ARGV: '' (unfenced), the author whose turns go, the
# time of their /forget ('' for all their turns). Removes each of their user turns sent
# by then (or stored without a time) and the reply that follows it, keeping the list's
# TTL; returns how many of their turns went (-1: the lock is lost).
FORGET = (
    FENCE
    + """
local before = tonumber(ARGV[3])
local raw = redis.call('LRANGE', KEYS[2], 0, -1)
local keep, removed, drop_reply = {}, 0, false
for _, item in ipairs(raw) do
  local ok, turn = pcall(cjson.decode, item)
  local role = ok and type(turn) == 'table' and turn['role'] or nil
  local at = role and turn['at'] or nil
  if role == 'user' and turn['author_id'] == ARGV[2]
      and (before == nil or type(at) ~= 'number' or at <= before) then
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
local ttl = redis.call('PTTL', KEYS[2])
redis.call('DEL', KEYS[2])
for i = 1, #keep, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(keep, i, math.min(i + 999, #keep)))
end
if #keep > 0 and ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return removed
"""
)

# KEYS: the lock, the conversation. ARGV: lock token. -1: the lock is lost.
RESET = FENCE + "redis.call('DEL', KEYS[2]) return 1"

# KEYS: the lock, the conversation. ARGV: lock token, the asking message's id, the new
# reply. Replaces the last turn if it is the reply to that message (Regenerate); 0 if
# the conversation has moved on, -1 if the lock is lost.
REPLACE_REPLY = (
    FENCE
    + """
local asked, replied = redis.call('LINDEX', KEYS[2], -2), redis.call('LINDEX', KEYS[2], -1)
if not asked or not replied then return 0 end
local ok_a, a = pcall(cjson.decode, asked)
local ok_r, r = pcall(cjson.decode, replied)
if not (ok_a and ok_r and type(a) == 'table' and type(r) == 'table') then return 0 end
if a['role'] ~= 'user' or a['id'] ~= ARGV[2] or r['role'] ~= 'assistant' then return 0 end
redis.call('LSET', KEYS[2], -1, ARGV[3])
return 1
"""
)

# KEYS: a person's /forget mark. ARGV: the time, TTL. Keeps the later of the two.
MARK = """
local now = tonumber(redis.call('GET', KEYS[1]))
if now == nil or now < tonumber(ARGV[1]) then now = ARGV[1] end
redis.call('SET', KEYS[1], now, 'EX', ARGV[2])
"""

# KEYS: the votes on a reply. ARGV: voter, verdict, TTL. The voter's previous verdict.
VOTE = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return before
"""

# KEYS: the count, its "told" flag. ARGV: tokens, TTL. The new total.
ADD_USAGE = """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return total
"""
# A day's counters outlive the day by one, for readers near midnight.
USAGE_SECONDS = 2 * 86400


async def _renew(lock: Lock, conversation: ConversationKey) -> None:
    """Keep a held lock alive while its reply is written (a reply can outlast it): every
    third of its life, and after a failure again every RENEW_RETRY_SECONDS until the
    lock would have expired. Lost (expired, or held by another): its writes are fenced."""
    clock = asyncio.get_running_loop().time
    expires = clock() + LOCK_SECONDS
    while True:
        await asyncio.sleep(LOCK_SECONDS / 3)
        while True:
            sent = clock()
            try:
                await lock.reacquire()
            except LockError:  # not ours any more: it expired and another took it
                log.warning("Lost the lock of %s: its reply will not be stored", conversation)
                return
            except REDIS_ERRORS as exc:
                if clock() + RENEW_RETRY_SECONDS >= expires:
                    log.warning(
                        "The lock of %s could not be renewed before it expired (%s): "
                        "its reply will not be stored",
                        conversation,
                        type(exc).__name__,
                    )
                    return
                log.debug("Renewing the lock of %s failed (%s); retrying", conversation, exc)
                await asyncio.sleep(RENEW_RETRY_SECONDS)
                continue
            expires = sent + LOCK_SECONDS
            break


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
    ) -> bool:
        """Store turns at the end, keeping at most the configured number. `present`:
        the authors of turns already there, whose lists of conversations are renewed
        with it (so that someone who stopped talking is still found by /forget).
        Whether the turns are kept: False when a /forget since took them again, when
        this process no longer holds the conversation's lock, or the store is down."""
        ...

    async def reset(self, conversation: ConversationKey) -> None:
        """Forget a conversation."""
        ...

    async def mark_forgotten(self, platform: str, user_id: str, at: float) -> None:
        """Record that the person asked at `at` (epoch seconds) to be forgotten: a turn
        of theirs sent before it and stored later is deleted as it is stored. Raises
        when the store cannot answer."""
        ...

    async def conversations_of(self, platform: str, user_id: str) -> list[ConversationKey]:
        """The conversations that may hold the person's turns. Raises when the store
        cannot answer (a forget must not report success it did not have)."""
        ...

    async def forget(
        self, conversation: ConversationKey, user_id: str, before: float | None = None
    ) -> int:
        """Remove the person's turns sent before `before` (None: all), and the replies
        to them, from a conversation, and the conversation from their list (a turn
        stored later lists it again); how many of their turns went. Raises when the
        store cannot answer."""
        ...

    async def replace_reply(
        self, conversation: ConversationKey, message_id: str, reply: Turn
    ) -> bool:
        """Make `reply` the conversation's last turn, in place of the reply to message
        `message_id`, if that exchange is still the last (Regenerate)."""
        ...

    async def add_usage(self, platform: str, user_id: str, day: str, tokens: int) -> int:
        """Count tokens to the person's UTC `day`; their total for it."""
        ...

    async def usage_of(self, platform: str, user_id: str, day: str) -> int:
        """The person's tokens for `day`."""
        ...

    async def claim_usage_note(self, platform: str, user_id: str, day: str) -> bool:
        """True once per person and day: whoever gets it sends the limit's note."""
        ...

    async def vote(
        self, conversation: ConversationKey, reply_id: str, voter_id: str, verdict: str
    ) -> str | None:
        """Record a person's verdict on a reply; their previous one (None: first)."""
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
        self._forgotten: dict[tuple[str, str], float] = {}  # (platform, user) -> when
        # (platform, user, day) -> [tokens, told]; (conversation, reply id) -> votes
        self._usage: dict[tuple[str, str, str], list[int]] = {}
        self._votes: OrderedDict[tuple[ConversationKey, str], dict[str, str]] = OrderedDict()
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
        # Counters of days before yesterday (ISO dates sort as days do).
        yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
        for counter in [k for k in self._usage if k[2] < yesterday]:
            del self._usage[counter]
        # A mark outlives any message in flight when it was made.
        old = time.time() - self._ttl
        for person in [p for p, at in self._forgotten.items() if at < old]:
            del self._forgotten[person]

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
    ) -> bool:
        now = time.monotonic()
        entry = self._store.get(conversation)
        stored = entry[1] if entry and now - entry[0] <= self._ttl else None
        if stored is None:
            stored = deque(maxlen=self._max_turns)
        stored.extend(turns)
        self._store[conversation] = (now, stored)
        kept = True
        for author in authors(turns):
            mark = self._forgotten.get((conversation.platform, author))
            if mark is not None and any(forgotten_by(t, author, mark) for t in turns):
                await self.forget(conversation, author, mark)
                kept = False
        return kept

    async def reset(self, conversation: ConversationKey) -> None:
        self._store.pop(conversation, None)

    async def mark_forgotten(self, platform: str, user_id: str, at: float) -> None:
        self._forgotten[(platform, user_id)] = max(at, self._forgotten.get((platform, user_id), at))

    async def conversations_of(self, platform: str, user_id: str) -> list[ConversationKey]:
        return [
            key
            for key, (_, turns) in self._store.items()
            if key.platform == platform and user_id in authors(turns)
        ]

    async def forget(
        self, conversation: ConversationKey, user_id: str, before: float | None = None
    ) -> int:
        entry = self._store.get(conversation)
        if entry is None:
            return 0
        kept, removed = without_author(entry[1], user_id, before)
        if removed:
            self._store[conversation] = (entry[0], deque(kept, maxlen=self._max_turns))
        return removed

    async def replace_reply(
        self, conversation: ConversationKey, message_id: str, reply: Turn
    ) -> bool:
        entry = self._store.get(conversation)
        if entry is None or len(entry[1]) < 2:
            return False
        asked, replied = entry[1][-2], entry[1][-1]
        if asked.role != "user" or asked.message_id != message_id or replied.role != "assistant":
            return False
        entry[1][-1] = reply
        return True

    async def add_usage(self, platform: str, user_id: str, day: str, tokens: int) -> int:
        counter = self._usage.setdefault((platform, user_id, day), [0, 0])
        counter[0] += tokens
        return counter[0]

    async def usage_of(self, platform: str, user_id: str, day: str) -> int:
        return self._usage.get((platform, user_id, day), [0, 0])[0]

    async def claim_usage_note(self, platform: str, user_id: str, day: str) -> bool:
        counter = self._usage.setdefault((platform, user_id, day), [0, 0])
        first, counter[1] = not counter[1], 1
        return first

    async def vote(
        self, conversation: ConversationKey, reply_id: str, voter_id: str, verdict: str
    ) -> str | None:
        votes = self._votes.setdefault((conversation, reply_id), {})
        self._votes.move_to_end((conversation, reply_id))
        while len(self._votes) > 10_000:  # bounded: the oldest replies' votes go
            self._votes.popitem(last=False)
        before = votes.get(voter_id)
        votes[voter_id] = verdict
        return before

    def turn(self, conversation: ConversationKey) -> AbstractAsyncContextManager[None]:
        return nullcontext()  # one process: the engine's own order suffices

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._store.clear()


class RedisMemory:
    """Conversation memory in Redis through redis.asyncio, on one server or a Redis
    Cluster (`cluster`; `open_memory` asks the server which).

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
        cluster: bool = False,
    ) -> None:
        self._max_turns = whole_exchanges(max_turns)
        self._ttl = ttl_seconds
        self._redis = connect(url, timeout, connection_class, cluster=cluster)
        self._outages = Outages(url, "replying without memory")
        # The conversations whose lock this process holds, with its token: the fence
        # of every write there.
        self._held: dict[ConversationKey, str] = {}

    @property
    def max_turns(self) -> int:
        return self._max_turns

    async def check(self) -> None:
        """Ping Redis once; raise ConfigError (exit code 2) naming the masked URL if not."""
        try:
            await self._redis.ping()
            replica = await is_replica(self._redis)
        except REDIS_ERRORS as exc:
            raise ConfigError(
                f"Cannot reach Redis at {self._outages.masked_url} (REDIS_URL): "
                f"{type(exc).__name__}"
            ) from None
        if replica:
            raise ConfigError(
                f"Redis at {self._outages.masked_url} (REDIS_URL) is a read-only replica: "
                "give the primary's address"
            )

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
    ) -> bool:
        if not turns:
            return True
        token = append_key(conversation, uuid.uuid4().hex)
        writers = sorted(authors(turns))
        try:
            # One round trip: the script, then the authors' sets (other slots), then
            # their /forget marks, read after both (see the module's docstring).
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.eval(
                    APPEND,
                    3,
                    lock_key(conversation),
                    redis_key(conversation),
                    token,
                    self._held.get(conversation, ""),
                    self._max_turns,
                    self._ttl,
                    APPEND_TOKEN_SECONDS,
                    *(encode_turn(t) for t in turns),
                )
                for author in sorted(authors(turns) | set(present)):
                    key = user_key(conversation.platform, author)
                    pipe.sadd(key, encode_conversation(conversation))
                    pipe.expire(key, self._ttl)
                for author in writers:
                    pipe.get(forgotten_key(conversation.platform, author))
                results = await pipe.execute()
            if int(results[0]) < 0:
                log.warning(
                    "Not storing a reply in %s: this process no longer holds its lock "
                    "(it expired, and another may have answered there since)",
                    conversation,
                )
                return False
            kept = True
            marks = results[len(results) - len(writers) :]
            for author, mark in zip(writers, marks, strict=True):
                if mark is not None and any(forgotten_by(t, author, float(mark)) for t in turns):
                    # Sent before their /forget and stored after it: taken again.
                    await self.forget(conversation, author, float(mark))
                    log.info("A message in %s was forgotten as it was stored", conversation)
                    kept = False
        except REDIS_ERRORS as exc:
            self._outages.failed("store turns", exc)
            return False
        self._outages.succeeded()
        return kept

    async def reset(self, conversation: ConversationKey) -> None:
        try:
            fence = self._held.get(conversation, "")
            done = await self._redis.eval(
                RESET, 2, lock_key(conversation), redis_key(conversation), fence
            )
        except REDIS_ERRORS as exc:
            self._outages.failed("reset a conversation", exc)
            return
        self._outages.succeeded()
        if int(done) < 0:
            log.warning("Not resetting %s: this process no longer holds its lock", conversation)

    async def replace_reply(
        self, conversation: ConversationKey, message_id: str, reply: Turn
    ) -> bool:
        fence = self._held.get(conversation, "")
        done = await self._redis.eval(
            REPLACE_REPLY,
            2,
            lock_key(conversation),
            redis_key(conversation),
            fence,
            message_id,
            encode_turn(reply),
        )
        return int(done) == 1

    async def add_usage(self, platform: str, user_id: str, day: str, tokens: int) -> int:
        key = usage_key(platform, user_id, day)
        return int(await self._redis.eval(ADD_USAGE, 1, key, tokens, USAGE_SECONDS))

    async def usage_of(self, platform: str, user_id: str, day: str) -> int:
        return int(await self._redis.get(usage_key(platform, user_id, day)) or 0)

    async def claim_usage_note(self, platform: str, user_id: str, day: str) -> bool:
        key = f"{usage_key(platform, user_id, day)}:told"
        return bool(await self._redis.set(key, 1, nx=True, ex=USAGE_SECONDS))

    async def vote(
        self, conversation: ConversationKey, reply_id: str, voter_id: str, verdict: str
    ) -> str | None:
        key = vote_key(conversation, reply_id)
        before = await self._redis.eval(VOTE, 1, key, voter_id, verdict, self._ttl)
        return before if isinstance(before, str) else None

    async def mark_forgotten(self, platform: str, user_id: str, at: float) -> None:
        # Kept as long as memory keeps anything: far past any message still in flight;
        # never moved back (a later forget from a clock behind).
        await self._redis.eval(MARK, 1, forgotten_key(platform, user_id), repr(at), self._ttl)

    async def conversations_of(self, platform: str, user_id: str) -> list[ConversationKey]:
        raw = await self._redis.smembers(user_key(platform, user_id))
        found = {decode_conversation(item) for item in raw}
        return sorted((c for c in found if c is not None), key=str)

    async def forget(
        self, conversation: ConversationKey, user_id: str, before: float | None = None
    ) -> int:
        # Not fenced: taking a person's turns out is right after any other write, in
        # any order, and must never be refused. Unlisted first: an append after this
        # (under the conversation's lock, so after the script) lists the conversation
        # again, and the next /forget finds it.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.srem(user_key(conversation.platform, user_id), encode_conversation(conversation))
            pipe.eval(
                FORGET,
                2,
                lock_key(conversation),
                redis_key(conversation),
                "",
                user_id,
                "" if before is None else repr(before),
            )
            _, removed = await pipe.execute()
        return int(removed)

    @asynccontextmanager
    async def turn(self, conversation: ConversationKey) -> AsyncIterator[None]:
        """A Redis lock per conversation (redis-py's, with our token, so only its holder
        releases it), renewed while held and expiring if its process dies. With
        replicas behind a load balancer, two quick messages in one thread are then
        answered one after the other, each with the other's exchange in its history.
        Redis unreachable, or a lock held past LOCK_WAIT_SECONDS: the reply goes on
        (unfenced: there is no lock to lose)."""
        lock = self._redis.lock(
            lock_key(conversation),
            timeout=LOCK_SECONDS,
            sleep=0.05,
            blocking_timeout=LOCK_WAIT_SECONDS,
            thread_local=False,
        )
        token = uuid.uuid4().hex
        try:
            held = bool(await lock.acquire(token=token))
            if not held:
                log.warning("Answering in %s without waiting longer for its lock", conversation)
        except REDIS_ERRORS as exc:
            self._outages.failed("order a conversation", exc)
            held = False
        renewal = asyncio.create_task(_renew(lock, conversation)) if held else None
        if held:
            self._held[conversation] = token
        try:
            yield
        finally:
            if renewal is not None:
                self._held.pop(conversation, None)
                renewal.cancel()
                with contextlib.suppress(*REDIS_ERRORS, LockError):
                    await lock.release()

    async def ready(self) -> bool:
        try:
            if isinstance(self._redis, RedisCluster):  # every slot served, not one node
                info = await self._redis.cluster_info()
                return bool(info.get("cluster_state") == "ok")
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
    url = settings.redis_url.get_secret_value()
    try:
        cluster = await is_cluster(url, configured=settings.redis_cluster)
    except REDIS_ERRORS as exc:
        raise ConfigError(
            f"Cannot reach Redis at {settings.redis_url_masked()} (REDIS_URL): {type(exc).__name__}"
        ) from None
    memory = RedisMemory(
        url, settings.memory_max_turns, settings.memory_ttl_seconds, cluster=cluster
    )
    try:
        await memory.check()
    except ConfigError:
        await memory.close()
        raise
    log.info(
        "Conversation memory in Redis %sat %s",
        "Cluster " if cluster else "",
        settings.redis_url_masked(),
    )
    return memory
