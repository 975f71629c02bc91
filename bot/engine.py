"""The async generation engine: one message in, one reply (or a stream of it) out.

For each message: wait for the conversation's earlier messages to be answered,
read its history (and its channel's persona) from memory, fit the prompt, generate
through the backend (the local model batched on a worker thread, so the event loop
never blocks, or an inference server), then store the user turn and the reply
together. Different conversations proceed concurrently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

from bot import metrics
from bot.attachments import prompt_text
from bot.inference.backend import Backend, Prompt
from bot.messages import (
    ConversationKey,
    Message,
    Reply,
    Turn,
    clean_name,
    clean_text,
    label_speakers,
)
from bot.settings import Settings
from bot.store.forgetting import Forgotten, forget_person
from bot.store.memory import Memory
from bot.store.schema import authors, from_first_user_turn

log = logging.getLogger(__name__)

APOLOGY = "Sorry, something went wrong while I was writing a reply. Please try again."
PERSONA_MAX_CHARS = 1000
BUSY = "I'm answering a lot of people right now. Please try again in a minute."
EMPTY_MESSAGE_REPLY = "Ask me anything: write your message and I'll answer."
NOTHING_TO_SAY = "I don't have an answer to that."
# A command (/reset, /forget, /persona…) that failed, e.g. memory unreachable.
COMMAND_FAILED = "Sorry, that didn't work. Please try again in a moment."


def truncation_note(prompt: Prompt) -> str:
    return (
        f"(Your message was too long for me: I read only its first "
        f"{len(prompt.user_text):,} of {prompt.original_chars:,} characters.)\n\n"
    )


class _ConversationOrder:
    """One FIFO lock per active conversation; the lock goes away with its last waiter."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def turn(self, conversation: ConversationKey) -> AsyncIterator[None]:
        key = str(conversation)
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()  # asyncio.Lock wakes waiters in arrival order
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class _Outcome:
    """Where a reply's generator leaves the whole reply. Apart from ReplyStream, so
    the generator holds no reference back to its stream: a stream dropped unclosed is
    freed (and its conversation's turn released) at once, not at the next GC cycle."""

    reply: Reply | None = None


class ReplyStream:
    """The reply to one message as an async iterator of text chunks.

    Iterate it to the end (or `aclose()` it): the conversation's next message waits
    until then, or until the stream is dropped. Afterwards `reply` holds the whole reply.
    """

    def __init__(self, engine: Engine, message: Message) -> None:
        self.message = message
        self._outcome = _Outcome()
        self._chunks = engine._produce(message, self._outcome)

    @property
    def reply(self) -> Reply | None:
        return self._outcome.reply

    def __aiter__(self) -> AsyncGenerator[str, None]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()


class Engine:
    """Answers messages with the model and the conversation's memory."""

    def __init__(
        self,
        backend: Backend,
        memory: Memory,
        *,
        max_queue: int = 256,
        speaker_names: bool = True,
    ) -> None:
        """`backend`: where replies are generated (bot.app chooses it).
        `speaker_names`: in shared conversations, the model sees who said each turn."""
        self.backend = backend
        self.memory = memory
        self.max_queue = max_queue
        self.speaker_names = speaker_names
        self._order = _ConversationOrder()
        self._pending = 0
        # (platform, author) -> conversations where their message is being answered
        self._answering: dict[tuple[str, str], list[ConversationKey]] = {}

    @classmethod
    def from_settings(cls, backend: Backend, memory: Memory, settings: Settings) -> Engine:
        """An engine with the configured queue limit."""
        return cls(
            backend,
            memory,
            max_queue=settings.max_queue,
            speaker_names=settings.speaker_names,
        )

    def stream(self, message: Message) -> ReplyStream:
        """The reply to `message`, chunk by chunk as the model writes it."""
        return ReplyStream(self, message)

    async def reply(self, message: Message) -> Reply:
        """The whole reply to `message`."""
        stream = self.stream(message)
        async for _ in stream:
            pass
        assert stream.reply is not None
        return stream.reply

    async def reset(self, conversation: ConversationKey) -> None:
        """Forget a conversation (after any reply in progress there)."""
        async with self._order.turn(conversation), self.memory.turn(conversation):
            await self.memory.reset(conversation)
            self.backend.forget(str(conversation))

    async def forget_user(self, platform: str, user_id: str) -> Forgotten:
        """Delete everything the person wrote on `platform` that is stored, and the
        replies to it, in every conversation; the model's caches of those go too.
        A reply in progress to them is stored first, then deleted with the rest."""
        return await forget_person(
            self.memory,
            platform,
            user_id,
            also=list(self._answering.get((platform, user_id), [])),
            hold=self._order.turn,
            drop_cache=self.backend.forget,
        )

    async def persona(self, conversation: ConversationKey) -> str | None:
        """The persona of the conversation's channel; None: the configured prompt."""
        return (await self.memory.load(conversation.channel_key()))[1]

    async def set_persona(self, conversation: ConversationKey, text: str | None) -> None:
        """Give the conversation's channel its own system prompt (None: the default).

        Raises ValueError past PERSONA_MAX_CHARS characters.
        """
        if text is not None:
            text = clean_text(text).strip()
            if len(text) > PERSONA_MAX_CHARS:
                raise ValueError(f"a persona is at most {PERSONA_MAX_CHARS:,} characters")
        await self.memory.set_persona(conversation.channel_key(), text or None)

    @property
    def active_conversations(self) -> int:
        return len(self._order)

    @property
    def pending(self) -> int:
        """Messages taken and not yet answered (queued, waiting or generating)."""
        return self._pending

    async def close(self) -> None:
        await self.backend.close()
        await self.memory.close()

    async def ready(self) -> bool:
        """The backend can generate and the memory store answers."""
        return await self.backend.ready() and await self.memory.ready()

    async def _produce(self, message: Message, out: _Outcome) -> AsyncGenerator[str, None]:
        platform = message.platform
        metrics.RECEIVED.labels(platform).inc()
        started = time.perf_counter()
        try:
            async for chunk in self._gate(message, out):
                yield chunk
        finally:
            ok = out.reply is not None and out.reply.ok
            (metrics.ANSWERED if ok else metrics.FAILED).labels(platform).inc()
            metrics.LATENCY.labels(platform).observe(time.perf_counter() - started)

    async def _gate(self, message: Message, out: _Outcome) -> AsyncGenerator[str, None]:
        # When it was sent, for a /forget: the platform's time, or ours on its arrival
        # here if that is earlier (a platform's clock, or a fake's, may run ahead).
        sent = min(message.timestamp.timestamp(), time.time())
        text = prompt_text(clean_text(message.text), message.files)
        if not text.strip():
            # Nothing to answer (e.g. only an image): the notes say why, else a hint.
            answer = "\n".join(message.notes) or EMPTY_MESSAGE_REPLY
            out.reply = Reply(answer)
            yield answer
            return
        if self._pending >= self.max_queue:
            # A flood: say so at once rather than queue without bound.
            log.warning("Busy: %d messages queued; turning one away", self._pending)
            out.reply = Reply(BUSY, ok=False)
            yield BUSY
            return
        self._pending += 1
        metrics.QUEUE.set(self._pending)
        author = (message.platform, message.author_id)
        self._answering.setdefault(author, []).append(message.conversation)
        try:
            async for chunk in self._answer(message, text, sent, out):
                yield chunk
        finally:
            self._pending -= 1
            metrics.QUEUE.set(self._pending)
            places = self._answering[author]
            places.remove(message.conversation)
            if not places:
                del self._answering[author]

    def _several_people(self, message: Message, history: list[Turn]) -> bool:
        """Whether the model should see who said each turn: in a shared place (not a DM)
        where someone else has spoken too. Names are noise to a one-person
        conversation, and a small model answers worse for them (measured: SmolLM2-135M
        answered "Ann: What is the capital of France?" in French)."""
        if not self.speaker_names or message.is_direct:
            return False
        return any(
            t.role == "user" and t.author_id and t.author_id != message.author_id for t in history
        )

    def _labelled(
        self, message: Message, history: list[Turn], name: str
    ) -> tuple[list[Turn], str | None]:
        """The history and speaker as the model is to see them: with one label per
        person (bot.messages.label_speakers) where names are shown, else as they are."""
        if not self._several_people(message, history):
            return history, None
        return label_speakers(history, message.author_id, name)

    async def _answer(
        self, message: Message, text: str, sent: float, out: _Outcome
    ) -> AsyncGenerator[str, None]:
        conversation = message.conversation
        async with self._order.turn(conversation), self.memory.turn(conversation):
            started = time.perf_counter()
            history, persona = await self.memory.load(conversation)
            parts: list[str] = []
            name = clean_name(message.author_name)
            shown, speaker = self._labelled(message, history, name)
            try:
                if message.notes:
                    note = "\n".join(message.notes) + "\n\n"
                    parts.append(note)
                    yield note
                prompt = await self.backend.prepare(shown, text, persona, speaker)
                prompt = dataclasses.replace(prompt, conversation=str(conversation))
                if prompt.truncated:
                    note = truncation_note(prompt)
                    parts.append(note)
                    yield note
                generated: list[str] = []
                async for chunk in self.backend.stream(prompt):
                    generated.append(chunk)
                    yield chunk
                answer = "".join(generated).strip()
                if not answer:
                    answer = NOTHING_TO_SAY
                    yield answer
            except Exception as error:
                log.exception(
                    "Generation failed in %s (message %s)", conversation, message.message_id
                )
                # A backend may say what would help (e.g. /reset when a conversation
                # no longer fits the server's window); otherwise the plain apology.
                told = getattr(error, "user_message", None)
                apology = ("\n\n" if parts else "") + (told if isinstance(told, str) else APOLOGY)
                out.reply = Reply("".join(parts) + apology, ok=False)
                yield apology
                return
            # Both turns at once, and only for a reply that was written in full.
            asked = Turn("user", prompt.user_text, message.author_id, name, sent_at=sent)
            replied = Turn("assistant", answer)
            turns = [asked, replied]
            if await self.memory.append(conversation, turns, present=authors(history)):
                # While the person reads and types: the next turn's prompt prepared
                # (its history as memory now keeps it), so it reads only its new text.
                kept = from_first_user_turn([*history, *turns][-self.memory.max_turns :])
                kept_shown, following = self._labelled(message, kept, name)
                self.backend.warm(str(conversation), kept_shown, persona, following)
            else:
                # Not kept (forgotten meanwhile, or the store is away): nor is its cache.
                self.backend.forget(str(conversation))
            out.reply = Reply("".join(parts) + answer, truncated_input=prompt.truncated)
            latency = time.perf_counter() - started
            log.info(
                "Replied in %s to message %s in %.2f s",
                conversation,
                message.message_id,
                latency,
                extra={"conversation": str(conversation), "latency_s": round(latency, 3)},
            )
