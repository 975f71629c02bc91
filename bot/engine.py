"""The async generation engine: one message in, one reply (or a stream of it) out.

For each message: wait for the conversation's earlier messages to be answered,
read its history (and its channel's persona) from memory, fit the prompt, generate
through the backend (the local model batched on a worker thread, so the event loop
never blocks, or an inference server), then store the user turn and the reply
together. Different conversations proceed concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import datetime

from bot import metrics
from bot.attachments import prompt_text
from bot.images import ImageInput
from bot.inference.backend import Backend, Note, Prompt
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
from bot.store.connection import REDIS_ERRORS
from bot.store.forgetting import Forgotten, forget_person
from bot.store.memory import Memory
from bot.store.schema import authors, from_first_user_turn
from bot.usage import Usage, limit_note, today

log = logging.getLogger(__name__)

APOLOGY = "Sorry, something went wrong while I was writing a reply. Please try again."
PERSONA_MAX_CHARS = 1000
BUSY = "I'm answering a lot of people right now. Please try again in a minute."
EMPTY_MESSAGE_REPLY = "Ask me anything: write your message and I'll answer."
NOTHING_TO_SAY = "I don't have an answer to that."
# A command (/reset, /forget, /persona…) that failed, e.g. memory unreachable.
COMMAND_FAILED = "Sorry, that didn't work. Please try again in a moment."
# After a Stop: the last chunk of the reply (memory keeps the text before it).
STOPPED_MARK = "\n\n(stopped)"
# A Regenerate refused (said to the presser only).
TOO_LATE = "That reply can't be written again: the conversation has moved on since."
NOT_YOURS = "Only the person who asked can have this reply written again."
SPENT = "You've used today's allowance: I can write replies again after midnight UTC."


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
    """Where a reply's generator leaves the whole reply, and hears of a Stop. Apart
    from ReplyStream, so the generator holds no reference back to its stream: a stream
    dropped unclosed is freed (and its conversation's turn released) at once, not at
    the next GC cycle."""

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self.stop = asyncio.Event()


class ReplyStream:
    """The reply to one message as an async iterator of text chunks.

    Iterate it to the end (or `aclose()` it): the conversation's next message waits
    until then, or until the stream is dropped. Afterwards `reply` holds the whole reply.
    """

    def __init__(self, engine: Engine, message: Message, regenerate_for: str | None = None) -> None:
        """`regenerate_for`: write the reply to the stored message `message.message_id`
        again, for `regenerate_for` (the presser), in place of the stored reply."""
        self.message = message
        self._outcome = _Outcome()
        self._chunks = engine._produce(message, self._outcome, regenerate_for)
        # Never in place of a reply still being written to that message (a Regenerate
        # pressed meanwhile waits its turn, and is refused: the live one stays stoppable).
        if message.message_id and engine.live(message.conversation, message.message_id) is None:
            engine._live[(message.conversation, message.message_id)] = self

    @property
    def reply(self) -> Reply | None:
        return self._outcome.reply

    def stop(self) -> None:
        """End the reply now: the text so far, then STOPPED_MARK; memory keeps the text."""
        self._outcome.stop.set()

    def __aiter__(self) -> AsyncGenerator[str, None]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()


async def _until(chunks: AsyncIterator[str], stop: asyncio.Event) -> AsyncIterator[str]:
    """`chunks` until `stop` is set, then at once: the pending read is cancelled (the
    backend's stream is closed: its row leaves the scheduler at the next step)."""
    stopped = asyncio.ensure_future(stop.wait())
    step: asyncio.Future[str] | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(chunks))
            await asyncio.wait((step, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                return  # stopped: the read is cancelled below
            try:
                yield step.result()
            except StopAsyncIteration:
                return
            if stop.is_set():
                return
    finally:
        # Also when this reader is cancelled or closed: the read in flight ends first
        # (a generator cannot be closed while it runs), then the stream.
        stopped.cancel()
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
        closing = getattr(chunks, "aclose", None)
        if closing is not None:
            await closing()


class Engine:
    """Answers messages with the model and the conversation's memory."""

    def __init__(
        self,
        backend: Backend,
        memory: Memory,
        *,
        max_queue: int = 256,
        speaker_names: bool = True,
        daily_tokens: int = 0,
        regenerate_temperature: float = 0.8,
    ) -> None:
        """`backend`: where replies are generated (bot.app chooses it).
        `speaker_names`: in shared conversations, the model sees who said each turn.
        `daily_tokens`: each person's allowance per UTC day (0: none)."""
        self.backend = backend
        self.memory = memory
        self.max_queue = max_queue
        self.speaker_names = speaker_names
        self.daily_tokens = daily_tokens
        self.regenerate_temperature = regenerate_temperature
        # Replies being written, by (conversation, asking message id): for Stop.
        self._live: weakref.WeakValueDictionary[tuple[ConversationKey, str], ReplyStream] = (
            weakref.WeakValueDictionary()
        )
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
            daily_tokens=settings.user_daily_tokens,
            regenerate_temperature=settings.regenerate_temperature,
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

    def live(self, conversation: ConversationKey, message_id: str) -> ReplyStream | None:
        """The reply being written now to message `message_id` in `conversation`
        (a regenerated one included); None once it has ended."""
        stream = self._live.get((conversation, message_id))
        return stream if stream is not None and stream.reply is None else None

    def stop(self, conversation: ConversationKey, message_id: str) -> bool:
        """Stop the reply being written to that message, at once; False if it had
        already ended (or is not known to this process)."""
        stream = self.live(conversation, message_id)
        if stream is None:
            return False
        stream.stop()
        return True

    def regenerate(
        self, conversation: ConversationKey, message_id: str, asker_id: str
    ) -> ReplyStream:
        """A new reply, sampled at the regenerate temperature, to the conversation's
        last message, which must be `message_id` by `asker_id`; it replaces the stored
        reply. Refused (another's message, a newer one since, nothing stored): no
        chunks, and `reply` is refused (not ok) with the note for the presser."""
        placeholder = Message(conversation, asker_id, "", "", message_id)
        return ReplyStream(self, placeholder, regenerate_for=asker_id)

    async def feedback(
        self, conversation: ConversationKey, reply_id: str, voter_id: str, verdict: str
    ) -> bool:
        """A person's 👍 ("up") or 👎 ("down") on a reply: counted once per person and
        reply, changeable. True when counted or changed; False when it was their vote
        already. Logged with ids only."""
        if verdict not in ("up", "down"):
            raise ValueError(f"a verdict is 'up' or 'down', not {verdict!r}")
        before = await self.memory.vote(conversation, reply_id, voter_id, verdict)
        if before == verdict:
            return False
        platform = conversation.platform
        metrics.FEEDBACK.labels(platform, verdict).inc()
        if before is not None:
            metrics.FEEDBACK_CHANGED.labels(platform, before).inc()
        log.info("Feedback %s on reply %s in %s (was %s)", verdict, reply_id, conversation, before)
        return True

    async def usage(self, platform: str, user_id: str) -> Usage:
        """What the person has used today, against their allowance."""
        return await self._usage(platform, user_id, *today())

    async def _usage(self, platform: str, user_id: str, day: str, resets_at: datetime) -> Usage:
        used = await self.memory.usage_of(platform, user_id, day)
        return Usage(used, self.daily_tokens, resets_at)

    async def reset(self, conversation: ConversationKey) -> None:
        """Forget a conversation (after any reply in progress there)."""
        async with self._order.turn(conversation), self.memory.turn(conversation):
            await self.memory.reset(conversation)
            self.backend.forget(str(conversation))

    async def forget_user(self, platform: str, user_id: str) -> Forgotten:
        """Delete everything the person wrote on `platform` that is stored, and the
        replies to it, in every conversation; the model's caches of those go too.
        A message of theirs still being answered is deleted as it is stored."""
        forgotten = await forget_person(
            self.memory,
            platform,
            user_id,
            also=list(self._answering.get((platform, user_id), [])),
            hold=self._order.turn,
            drop_cache=self.backend.forget,
        )
        # Not their token counters: numbers, no text, gone in two days; deleting them
        # would hand anyone a fresh allowance for the asking (/forget is open to all).
        return forgotten

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
    def takes_images(self) -> bool:
        """Whether a message's images reach the model now (else they get a note)."""
        return self.backend.takes_images

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

    async def _produce(
        self, message: Message, out: _Outcome, regenerate_for: str | None
    ) -> AsyncGenerator[str, None]:
        platform = message.platform
        metrics.RECEIVED.labels(platform).inc()
        started = time.perf_counter()
        try:
            chunks = (
                self._gate(message, out)
                if regenerate_for is None
                else self._regenerate(message, regenerate_for, out)
            )
            async for chunk in chunks:
                yield chunk
        finally:
            reply = out.reply
            if reply is None or not (reply.refused or reply.silent):
                ok = reply is not None and reply.ok
                (metrics.ANSWERED if ok else metrics.FAILED).labels(platform).inc()
            metrics.LATENCY.labels(platform).observe(time.perf_counter() - started)

    async def _gate(self, message: Message, out: _Outcome) -> AsyncGenerator[str, None]:
        # When it was sent, for a /forget: the platform's time, or ours on its arrival
        # here if that is earlier (a platform's clock, or a fake's, may run ahead).
        sent = min(message.timestamp.timestamp(), time.time())
        said = clean_text(message.text)
        text = prompt_text(said, message.files)
        if not text.strip() and not message.images:
            # Nothing to answer (e.g. only an image, for a text-only model): the notes
            # say why, else a hint.
            answer = "\n".join(message.notes) or EMPTY_MESSAGE_REPLY
            out.reply = Reply(answer)
            yield answer
            return
        # Images leave their names in the text (what memory keeps), never their bytes.
        text = prompt_text(said, message.files, message.image_names)
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

    async def _limited(self, platform: str, user_id: str) -> Reply | None:
        """The reply to a person past their daily allowance: the note once a day,
        silence after it; None while they have some left (or the store is away: no
        count to go by, so answer)."""
        if not self.daily_tokens:
            return None
        try:
            day, resets_at = today()
            usage = await self._usage(platform, user_id, day, resets_at)
            if not usage.exhausted:
                return None
            told = not await self.memory.claim_usage_note(platform, user_id, day)
        except REDIS_ERRORS:
            return None
        metrics.LIMITED.labels(platform).inc()
        return Reply("", silent=True) if told else Reply(limit_note(usage))

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
            # The daily allowance, once the messages before it are answered (they may
            # have spent what was left when it arrived).
            limited = await self._limited(message.platform, message.author_id)
            if limited is not None:
                out.reply = limited
                if limited.text:
                    yield limited.text
                return
            started = time.perf_counter()
            history, persona = await self.memory.load(conversation)
            name = clean_name(message.author_name)
            shown, speaker = self._labelled(message, history, name)
            written = _Written()
            if message.notes:
                written.parts.append("\n".join(message.notes) + "\n\n")
                yield written.parts[0]
            # Only this message's images go with the prompt (a backend that no longer
            # takes images says so, and answers the text).
            async for chunk in self._write(
                message,
                written,
                out,
                self.backend.prepare(shown, text, persona, speaker),
                images=message.images,
            ):
                yield chunk
            if written.prompt is None or written.failed:
                return
            prompt, answer = written.prompt, written.answer
            if answer:  # stopped before any word: nothing to keep
                asked = Turn(
                    "user",
                    prompt.user_text,
                    message.author_id,
                    name,
                    sent_at=sent,
                    message_id=message.message_id,
                )
                turns = [asked, Turn("assistant", answer)]
                if await self.memory.append(conversation, turns, present=authors(history)):
                    kept = from_first_user_turn([*history, *turns][-self.memory.max_turns :])
                    self._stored(out, message, kept, name, persona)
                else:
                    # Not kept (forgotten meanwhile, the store away): nor is its cache.
                    self.backend.forget(str(conversation))
            latency = time.perf_counter() - started
            log.info(
                "Replied in %s to message %s in %.2f s%s",
                conversation,
                message.message_id,
                latency,
                " (stopped)" if written.stopped else "",
                extra={"conversation": str(conversation), "latency_s": round(latency, 3)},
            )

    async def _write(
        self,
        message: Message,
        written: _Written,
        out: _Outcome,
        preparing: Awaitable[Prompt],
        temperature: float | None = None,
        images: tuple[ImageInput, ...] = (),
    ) -> AsyncGenerator[str, None]:
        """Generate a reply: its chunks (a truncation note first), until the end or a
        Stop; `written` and `out.reply` hold the outcome. A failure: the apology."""
        conversation = message.conversation
        parts = written.parts
        try:
            prompt = await preparing
            prompt = dataclasses.replace(
                prompt, conversation=str(conversation), temperature=temperature, images=images
            )
            written.prompt = prompt
            if prompt.truncated:
                note = truncation_note(prompt)
                parts.append(note)
                yield note
            generated = written.generated
            async for chunk in _until(self.backend.stream(prompt), out.stop):
                if isinstance(chunk, Note):  # the backend's note: shown, not stored
                    parts.append(chunk)
                else:
                    generated.append(chunk)
                yield chunk
            written.answer = "".join(generated).strip()
        except Exception as error:
            written.failed = True
            log.exception("Generation failed in %s (message %s)", conversation, message.message_id)
            # A backend may say what would help (e.g. /reset when a conversation no
            # longer fits the server's window); otherwise the plain apology.
            told = getattr(error, "user_message", None)
            apology = ("\n\n" if parts else "") + (told if isinstance(told, str) else APOLOGY)
            out.reply = Reply("".join(parts) + apology, ok=False)
            yield apology
            return
        finally:
            # Whatever came of it (a failure, the reader gone at the last word): what was
            # generated was spent, by the message's author.
            if written.prompt is not None:
                spent = "".join(written.generated)
                await self._count(message.platform, message.author_id, written.prompt, spent)
        if out.stop.is_set():
            written.stopped = True
            metrics.STOPPED.labels(message.platform).inc()
            yield STOPPED_MARK
            shown = "".join(parts) + written.answer + STOPPED_MARK
            out.reply = Reply(shown, truncated_input=prompt.truncated, stopped=True)
            return
        if not written.answer:
            written.answer = NOTHING_TO_SAY
            yield NOTHING_TO_SAY
        out.reply = Reply("".join(parts) + written.answer, truncated_input=prompt.truncated)

    async def _count(self, platform: str, user_id: str, prompt: Prompt, answer: str) -> None:
        """Count a reply's tokens (its prompt's and its own) to the person's day."""
        if not self.daily_tokens:
            return
        read = len(prompt.input_ids) or await self.backend.count_tokens(
            "\n".join(m.get("content", "") for m in prompt.messages)
        )
        tokens = read + await self.backend.count_tokens(answer)
        try:
            await self.memory.add_usage(platform, user_id, today()[0], tokens)
        except REDIS_ERRORS:
            log.warning("Could not count %d tokens for a %s user", tokens, platform)

    def _stored(
        self, out: _Outcome, message: Message, kept: list[Turn], name: str, persona: str | None
    ) -> None:
        """A reply now in memory (`kept`: the history as memory keeps it): the reply
        says so, and while the person reads and types the next turn's prompt is
        prepared, so that turn reads only its new text."""
        if out.reply is not None:
            out.reply = dataclasses.replace(out.reply, kept=True)
        kept_shown, following = self._labelled(message, kept, name)
        self.backend.warm(str(message.conversation), kept_shown, persona, following)

    async def _regenerate(
        self, placeholder: Message, asker_id: str, out: _Outcome
    ) -> AsyncGenerator[str, None]:
        conversation, message_id = placeholder.conversation, placeholder.message_id
        async with self._order.turn(conversation), self.memory.turn(conversation):
            history, persona = await self.memory.load(conversation)
            last = history[-2:]
            if (
                not message_id  # turns stored by older versions carry no id
                or len(last) < 2
                or last[0].role != "user"
                or last[1].role != "assistant"
                or last[0].message_id != message_id
            ):
                out.reply = Reply(TOO_LATE, ok=False, refused=True)
                return
            asked = last[0]
            if asked.author_id != asker_id:
                out.reply = Reply(NOT_YOURS, ok=False, refused=True)
                return
            limited = await self._limited(conversation.platform, asker_id)
            if limited is not None:
                note = limited.text or SPENT
                out.reply = Reply(note, ok=False, refused=True)
                return
            message = dataclasses.replace(
                placeholder, author_name=asked.author_name, text=asked.content
            )
            earlier = history[:-2]
            shown, speaker = self._labelled(message, earlier, asked.author_name)
            written = _Written()
            preparing = self.backend.prepare(shown, asked.content, persona, speaker)
            async for chunk in self._write(
                message, written, out, preparing, self.regenerate_temperature
            ):
                yield chunk
            if written.prompt is None or written.failed:
                return
            metrics.REGENERATED.labels(conversation.platform).inc()
            if written.answer:
                replaced = Turn("assistant", written.answer)
                try:
                    stored = await self.memory.replace_reply(conversation, message_id, replaced)
                except REDIS_ERRORS:
                    stored = False
                if stored:
                    kept = [*earlier, asked, replaced]
                    self._stored(out, message, kept, asked.author_name, persona)
                else:
                    log.warning("The regenerated reply in %s was not stored", conversation)


@dataclasses.dataclass
class _Written:
    """What `Engine._write` left: the prompt, the reply's text, how it ended."""

    parts: list[str] = dataclasses.field(default_factory=list)  # notes before the reply
    prompt: Prompt | None = None
    generated: list[str] = dataclasses.field(default_factory=list)  # the model's chunks
    answer: str = ""
    stopped: bool = False
    failed: bool = False
