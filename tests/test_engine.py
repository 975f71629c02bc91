"""The engine on the real bundled model: memory, order, streaming, failures, loop lag."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from bot.engine import APOLOGY, EMPTY_MESSAGE_REPLY, Engine
from bot.inference.backend import Prompt
from bot.inference.generation import Generator
from bot.inference.loader import LoadedModel
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message, Turn
from bot.store.memory import InProcessMemory, RedisMemory
from tests.conftest import RedisServer, greedy
from tests.scripted import ScriptedModel
from tests.test_memory import CountingConnection

pytestmark = pytest.mark.model


class Recorder:
    """The real Generator, recording each prompt it is given and failing on request."""

    def __init__(self, inner: Generator, fail_on: str | None = None) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.prompts: list[str] = []
        self.generations = 0

    def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        return self.inner.prepare(history, user_text, system_prompt, speaker)

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        sinks: Sequence[Callable[[str], None]],
        stops: Sequence[threading.Event],
    ) -> list[str]:
        for prompt in prompts:
            self.prompts.append(self.inner.loaded.tokenizer.decode(prompt.input_ids))
            self.generations += 1
            if self.fail_on and self.fail_on in prompt.user_text:
                raise RuntimeError("the model broke")
        return self.inner.generate_batch(prompts, sinks, stops)


def msg(text: str, channel: str = "c1", message_id: str = "") -> Message:
    return Message(ConversationKey("test", channel), "u1", "User", text, message_id)


def memory() -> InProcessMemory:
    return InProcessMemory(max_turns=20, ttl_seconds=3600)


async def test_greedy_answer_to_a_known_question(bundled: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(bundled)), memory())
    message = msg("What is the capital of France?")
    reply = await engine.reply(message)
    assert reply.ok and "Paris" in reply.text
    stored = await engine.memory.history(ConversationKey("test", "c1"))
    sent = message.timestamp.timestamp()
    asked = Turn("user", "What is the capital of France?", "u1", "User", sent_at=sent)
    assert stored == [asked, Turn("assistant", reply.text)]
    await engine.close()


async def test_history_reaches_the_model(bundled: LoadedModel) -> None:
    recorder = Recorder(greedy(bundled, max_new_tokens=16))
    engine = Engine(LocalBackend(recorder), memory())
    await engine.reply(msg("My name is Zorblax and my favourite colour is teal."))
    second = await engine.reply(msg("What is my name?"))
    # The fact told in turn one is in turn two's prompt, before the new question.
    assert "Zorblax" in recorder.prompts[1]
    assert recorder.prompts[1].index("Zorblax") < recorder.prompts[1].index("What is my name?")
    # Another conversation's prompt never holds it.
    await engine.reply(msg("What is my name?", channel="elsewhere"))
    assert "Zorblax" not in recorder.prompts[2]
    # Whether the 135M model uses the fact is its own affair; record it for the note.
    logging.getLogger(__name__).info("Second reply: %r", second.text)
    await engine.close()


async def test_stream_chunks_make_the_reply(bundled: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=32)), memory())
    stream = engine.stream(msg("Name three colours."))
    chunks = [chunk async for chunk in stream]
    assert len(chunks) > 1, "the reply arrives in several pieces"
    assert stream.reply is not None and "".join(chunks).strip() == stream.reply.text
    await engine.close()


async def test_order_within_a_conversation_under_concurrency(bundled: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=4)), memory())
    sent: dict[str, list[str]] = {f"conv{c}": [] for c in range(3)}
    tasks = []
    for i in range(4):
        for channel, texts in sent.items():
            text = f"Message {i} in {channel}: say a number."
            texts.append(text)
            tasks.append(asyncio.create_task(engine.reply(msg(text, channel))))
    replies = await asyncio.gather(*tasks)
    assert all(r.ok for r in replies)
    for channel, texts in sent.items():
        stored = await engine.memory.history(ConversationKey("test", channel))
        assert [t.content for t in stored if t.role == "user"] == texts
        assert [t.role for t in stored] == ["user", "assistant"] * 4
    assert engine.active_conversations == 0  # no lock left behind
    await engine.close()


async def test_other_conversations_do_not_wait(bundled: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=8)), memory())
    first = engine.stream(msg("Tell me about cats.", "a"))
    iterator = aiter(first)
    await anext(iterator)  # conversation a is now mid-reply, and stays so
    queued = asyncio.create_task(engine.reply(msg("And dogs?", "a")))
    other = await asyncio.wait_for(engine.reply(msg("Hello!", "b")), timeout=60)
    assert other.ok
    assert not queued.done(), "a's second message waits for a's first reply"
    async for _ in iterator:
        pass
    assert (await queued).ok
    await engine.close()


async def test_failed_generation_apologises_and_the_next_works(
    bundled: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine(
        LocalBackend(Recorder(greedy(bundled, max_new_tokens=8), fail_on="BOOM")), memory()
    )
    key = ConversationKey("test", "c1")
    await engine.reply(msg("Hello"))
    failed = await engine.reply(msg("BOOM please", message_id="m2"))
    assert not failed.ok and failed.text == APOLOGY
    assert "the model broke" not in failed.text  # the details go to the log only
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged and logged[0].exc_info is not None and "m2" in logged[0].getMessage()
    assert len(await engine.memory.history(key)) == 2  # the failed turn is not stored
    after = await engine.reply(msg("What is 2 plus 2?"))
    assert after.ok and len(await engine.memory.history(key)) == 4
    await engine.close()


async def test_too_long_message_is_cut_and_the_reply_says_so(bundled: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=8, context_tokens=200)), memory())
    text = "Please summarise this. " + "lorem ipsum dolor sit amet " * 2000
    reply = await engine.reply(msg(text))
    assert reply.ok and reply.truncated_input
    assert reply.text.startswith("(Your message was too long for me: I read only its first ")
    stored = await engine.memory.history(ConversationKey("test", "c1"))
    assert text.startswith(stored[0].content) and len(stored[0].content) < len(text)
    await engine.close()


async def test_empty_and_hostile_text(bundled: LoadedModel) -> None:
    recorder = Recorder(greedy(bundled, max_new_tokens=4))
    engine = Engine(LocalBackend(recorder), memory())
    assert (await engine.reply(msg("  \n\t "))).text == EMPTY_MESSAGE_REPLY
    assert recorder.generations == 0
    hostile = await engine.reply(msg("nul\x00 lone \ud800 surrogate \u202e rtl"))
    assert hostile.ok
    await engine.close()


async def test_event_loop_keeps_running_during_generation(bundled: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=48)), memory())
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    await engine.reply(msg("Write a short poem about the sea."))
    took = time.perf_counter() - started
    done.set()
    await tick
    # A blocked loop would show one lag as long as the generation itself.
    assert took > 0.5, "the generation must be long enough to tell"
    assert max(lags) < took / 4, f"loop lag {max(lags):.3f} s during a {took:.2f} s reply"
    logging.getLogger(__name__).info("max loop lag %.1f ms over %.2f s", max(lags) * 1e3, took)
    await engine.close()


async def test_redis_round_trips_per_message_and_outage(
    bundled: LoadedModel, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisMemory(redis_server.url, 20, 600, timeout=0.5, connection_class=CountingConnection)
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=4)), store)
    key = ConversationKey("test", "c1")
    await engine.reply(msg("Hello"))
    CountingConnection.sends = 0
    await engine.reply(msg("How are you?"))
    # One round trip to read, one to write, two for the conversation's lock (so that
    # replicas answer one message of a conversation at a time).
    assert CountingConnection.sends == 4
    assert len(await store.history(key)) == 4

    redis_server.stop()
    during = [await engine.reply(msg(f"Still there? {i}")) for i in range(3)]
    assert all(r.ok for r in during), "replies go on without memory"
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1

    redis_server.start()  # a fresh, empty server on the same port
    back = await engine.reply(msg("Back again"))
    assert back.ok
    assert (await store.history(key))[0].content == "Back again"
    await engine.close()


async def test_a_dropped_stream_releases_its_conversation() -> None:
    """A stream abandoned without aclose() does not hold its conversation until the
    garbage collector runs (it is disabled here)."""
    engine = Engine(LocalBackend(ScriptedModel("word " * 200, chunk=5, delay=0.01)), memory())
    gc.disable()
    try:
        stream = engine.stream(msg("first"))
        await anext(aiter(stream))
        del stream  # dropped mid-reply, never closed
        second = await asyncio.wait_for(engine.reply(msg("second")), timeout=30)
        assert second.ok
    finally:
        gc.enable()
    await engine.close()
