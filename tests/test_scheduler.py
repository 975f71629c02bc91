"""The step scheduler on the real bundled model, in fp32 and greedy: every reply is,
token for token, what a bare `model.generate` gives on the same prompt, whatever
rows join or leave meanwhile, and with each conversation's cache reused across turns,
after trimming and after eviction."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from bot.engine import APOLOGY, BUSY, Engine
from bot.inference.backend import Prompt
from bot.inference.generation import Generator
from bot.inference.loader import LoadedModel, load_model
from bot.inference.local import LocalBackend
from bot.inference.scheduler import Row, Scheduler
from bot.messages import ConversationKey, Message, Turn
from bot.store.memory import InProcessMemory
from tests.conftest import greedy, make_settings, settle

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def fp32(model_cache_dir: Any) -> LoadedModel:
    return load_model(make_settings(model_cache_dir=model_cache_dir, dtype="fp32"))


def msg(text: str, channel: str) -> Message:
    return Message(ConversationKey("test", channel), "u1", "User", text, is_direct=True)


def bare(generator: Generator, history: list[Turn], text: str) -> str:
    """`model.generate` alone on the prompt the engine builds (bot.inference.batching's path)."""
    return generator.generate(generator.prepare(history, text))


def scheduler_of(engine: Engine) -> Scheduler:
    scheduler = getattr(engine.backend, "scheduler", None)
    assert isinstance(scheduler, Scheduler)
    return scheduler


async def test_rows_joining_and_leaving_match_generate(fp32: LoadedModel) -> None:
    # Small prompt chunks: every prompt is read over several steps, between the
    # other rows' decoding.
    generator = greedy(fp32, max_new_tokens=24, prefill_chunk_tokens=16)
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
    questions = {
        "a": "What is the capital of France?",
        "b": "Write one sentence about the sea and the sky at night.",
        "c": "Name a colour.",
        "d": "What is 2 plus 2?",
    }
    leaver = engine.stream(msg("Tell me a very long story about dragons.", "gone"))
    chunks = aiter(leaver)
    await anext(chunks)  # running; it leaves after the others have joined

    async def ask(channel: str, delay: float) -> str:
        await asyncio.sleep(delay)
        return (await engine.reply(msg(questions[channel], channel))).text

    tasks = [asyncio.create_task(ask(c, 0.2 * i)) for i, c in enumerate(questions)]
    await asyncio.sleep(0.3)
    await leaver.aclose()
    replies = dict(zip(questions, await asyncio.gather(*tasks), strict=True))
    scheduler = scheduler_of(engine)
    assert scheduler.max_running > 1, "rows ran together"
    for channel, text in questions.items():
        assert replies[channel] == bare(generator, [], text).strip(), channel
    assert "Paris" in replies["a"]
    await engine.close()


async def test_cache_reused_across_turns_trimmed_and_evicted(fp32: LoadedModel) -> None:
    generator = greedy(fp32, max_new_tokens=16)
    # Four turns kept: from the third message on, the oldest exchange is trimmed and
    # the prompt's prefix changes after the system prompt.
    memory = InProcessMemory(4, 600)
    engine = Engine(LocalBackend(generator), memory)
    scheduler = scheduler_of(engine)
    key = ConversationKey("test", "talk")
    for i, text in enumerate(
        ["Hello! Who are you?", "What is the sea?", "Name a fruit.", "And a vegetable?"]
    ):
        history = await memory.history(key)
        reused_before = scheduler.reused_tokens
        reply = await engine.reply(msg(text, "talk"))
        assert reply.text == bare(generator, history, text).strip(), f"turn {i + 1}"
        if i == 1:
            # Turn 2 reads only its new tokens: turn 1's prompt and reply came from the cache.
            prompt = generator.prepare(history, text).input_ids
            assert scheduler.reused_tokens - reused_before > len(prompt) // 2
    await engine.close()

    # A budget too small for any conversation: every turn rebuilt, same replies.
    evicting = greedy(fp32, max_new_tokens=16, kv_cache_mb=0)
    engine = Engine(LocalBackend(evicting), InProcessMemory(20, 600))
    turns: list[Turn] = []
    for text in ["Hello! Who are you?", "What is the sea?"]:
        reply = await engine.reply(msg(text, "talk"))
        assert reply.text == bare(evicting, turns, text).strip()
        turns += [Turn("user", text), Turn("assistant", reply.text)]
    assert scheduler_of(engine).reused_tokens == 0
    await engine.close()


async def test_reset_forgets_the_cache(fp32: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(fp32, max_new_tokens=8)), InProcessMemory(20, 600))
    scheduler = scheduler_of(engine)
    await engine.reply(msg("Hello!", "r"))
    await settle(engine)  # the cache is copied into the store off the worker thread
    kept = str(ConversationKey("test", "r"))
    assert scheduler.store.peek(kept) is not None
    await engine.reset(ConversationKey("test", "r"))
    await engine.reply(msg("Hello!", "other"))  # the forget is applied between steps
    await settle(engine)
    # Only "other" is left (and the system prompt's opening, shared by every conversation).
    assert scheduler.store.peek(kept) is None
    assert scheduler.store.peek(str(ConversationKey("test", "other"))) is not None
    await engine.close()


async def test_a_finished_rows_cache_is_copied_while_the_others_go_on(
    fp32: LoadedModel,
) -> None:
    """A row that ends has its cache copied into the store (tens of MB for a long
    conversation) on a thread of its own: with that copy held up, another row keeps
    writing, and the cache lands once the copy is done."""
    generator = greedy(fp32, max_new_tokens=64, batch_size=4)
    scheduler = generator.scheduler
    assert scheduler is not None
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
    pool = scheduler._pool
    copy, copying, release = pool.save, threading.Event(), threading.Event()

    def held_up(slot: int, length: int) -> Any:
        copying.set()
        release.wait(60)
        return copy(slot, length)

    pool.save = held_up  # type: ignore[method-assign]
    try:
        story = aiter(engine.stream(msg("Tell me a very long story about dragons.", "long")))
        await anext(story)
        short = await engine.reply(msg("Name a colour.", "short"))
        assert short.ok
        assert await asyncio.to_thread(copying.wait, 60)
        # The copy is stuck; the story still gets its next words.
        for _ in range(3):
            await asyncio.wait_for(anext(story), 30)
        assert scheduler.store.peek(str(ConversationKey("test", "short"))) is None
    finally:
        release.set()
    async for _ in story:
        pass
    await settle(engine)
    assert scheduler.store.peek(str(ConversationKey("test", "short"))) is not None
    await engine.close()


async def test_reader_going_away_frees_its_place_at_once(fp32: LoadedModel) -> None:
    # One row at a time: had the first row kept its place, the second would wait
    # for all 200 of its tokens.
    engine = Engine(
        LocalBackend(greedy(fp32, max_new_tokens=200, batch_size=1)), InProcessMemory(20, 600)
    )
    scheduler = scheduler_of(engine)
    first = engine.stream(msg("Count from one to one thousand, in words.", "a"))
    chunks = aiter(first)
    await anext(chunks)
    await first.aclose()
    second = await engine.reply(msg("Name a colour.", "b"))
    assert second.ok
    assert scheduler.steps < 200
    assert scheduler.running == 0
    await engine.close()


async def test_flood_past_max_queue_gets_the_busy_answer(fp32: LoadedModel) -> None:
    engine = Engine(
        LocalBackend(greedy(fp32, max_new_tokens=8)), InProcessMemory(20, 600), max_queue=3
    )
    replies = await asyncio.gather(*(engine.reply(msg("Hi!", f"c{i}")) for i in range(8)))
    busy = [r for r in replies if r.text == BUSY]
    assert len(busy) == 5 and all(not r.ok for r in busy)
    assert all(r.ok for r in replies if r.text != BUSY)
    await engine.close()


async def test_a_failing_row_fails_alone(fp32: LoadedModel) -> None:
    """A prompt the model cannot read (a token id past its vocabulary) gets the
    apology; the rows stepping with it are answered."""
    generator = greedy(fp32, max_new_tokens=12)
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
    original = generator.prepare

    def poisoned(
        history: Sequence[Turn], text: str, system: str | None = None, speaker: str | None = None
    ) -> Prompt:
        prompt = original(history, text, system, speaker)
        if "poison" in text:
            return dataclasses.replace(prompt, input_ids=[10**9, *prompt.input_ids])
        return prompt

    generator.prepare = poisoned  # type: ignore[method-assign,assignment]
    good = [asyncio.create_task(engine.reply(msg(f"Say hello {i}.", f"g{i}"))) for i in range(3)]
    await asyncio.sleep(0.05)
    bad = await engine.reply(msg("poison", "bad"))
    assert not bad.ok
    assert all(r.ok for r in await asyncio.gather(*good))
    await engine.close()


async def test_close_stops_a_long_reply_without_blocking_the_loop(fp32: LoadedModel) -> None:
    """Shutdown stops the running rows (no waiting for 1,000 tokens), off the event
    loop, and a reply cut short is not stored as if it were whole."""
    engine = Engine(LocalBackend(greedy(fp32, max_new_tokens=1000)), InProcessMemory(20, 600))
    scheduler = scheduler_of(engine)
    stream = engine.stream(msg("Count from one to one thousand, in words.", "long"))
    chunks = aiter(stream)
    await anext(chunks)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            # Every pass of the loop: a close that takes a few ms must still be seen.
            await asyncio.sleep(0)
            ticks += 1

    tick = asyncio.create_task(ticker())
    closing = asyncio.create_task(engine.close())
    rest = [chunk async for chunk in chunks]
    await asyncio.wait_for(closing, timeout=60)
    tick.cancel()
    assert ticks > 0, "the loop ran while the engine closed"
    assert scheduler.steps < 1000 and scheduler.running == 0
    assert stream.reply is not None and not stream.reply.ok  # the apology, not a reply
    assert rest and rest[-1].endswith(APOLOGY)  # the engine stores nothing then


def test_a_row_failing_after_the_forward_pass_fails_alone(fp32: LoadedModel) -> None:
    """A failure in one row's own part of a step (here its text hand-over raises,
    after the shared forward pass) ends that row with the error; the rows stepping
    with it go on, token for token as alone, on caches nobody else wrote into."""
    generator = greedy(fp32, max_new_tokens=24)
    scheduler = generator.scheduler
    assert scheduler is not None
    questions = ["What is the capital of France?", "Name a colour.", "What is 2 plus 2?"]
    prompts = [generator.prepare([], q) for q in questions]
    results: dict[int, tuple[str | None, BaseException | None]] = {}
    done = threading.Event()

    def finish(index: int) -> Callable[[str | None, BaseException | None], None]:
        def finished(text: str | None, error: BaseException | None) -> None:
            assert index not in results, "finished once"
            results[index] = (text, error)
            if len(results) == len(prompts):
                done.set()

        return finished

    def breaking(text: str) -> None:
        raise RuntimeError("the reader broke")

    for i, prompt in enumerate(prompts):
        sink = breaking if i == 1 else (lambda _text: None)
        scheduler.submit(Row(prompt.input_ids, f"row{i}", sink, threading.Event(), finish(i)))
    assert done.wait(120)
    assert isinstance(results[1][1], RuntimeError)
    for i in (0, 2):
        assert results[i][1] is None
        assert results[i][0] == generator.generate(prompts[i]), questions[i]
    assert scheduler.running == 0
    assert scheduler.close(10)


async def test_shutdown_stores_nothing_for_queued_messages(fp32: LoadedModel) -> None:
    """Messages still queued when the bot stops get no reply in memory (they were
    stored as "I don't have an answer to that." once)."""
    memory = InProcessMemory(20, 600)
    engine = Engine(
        LocalBackend(greedy(fp32, max_new_tokens=1000, batch_size=1)), memory, max_queue=10
    )
    running = engine.stream(msg("Count from one to one thousand, in words.", "running"))
    chunks = aiter(running)
    await anext(chunks)
    queued = [asyncio.create_task(engine.reply(msg("Name a colour.", f"q{i}"))) for i in range(3)]
    await asyncio.sleep(0.2)
    closing = asyncio.create_task(engine.close())
    _ = [chunk async for chunk in chunks]
    replies = await asyncio.gather(*queued)
    await closing
    assert all(not reply.ok for reply in replies)
    for channel in ("running", "q0", "q1", "q2"):
        assert await memory.history(ConversationKey("test", channel)) == [], channel


@pytest.mark.parametrize("others", [1, 3, 8])
async def test_a_reply_does_not_depend_on_who_shares_its_steps(
    fp32: LoadedModel, others: int
) -> None:
    """Greedy, fp32, 64 tokens: one conversation's reply alone and beside 1, 3 and 8
    others (asked at the same time, so every step is shared) is the same."""
    question = "Write a short paragraph about the history of bread."

    async def reply_with(count: int) -> str:
        engine = Engine(
            LocalBackend(greedy(fp32, max_new_tokens=64, batch_size=16)), InProcessMemory(20, 600)
        )
        try:
            texts = [f"Tell me about animal number {i}." for i in range(count)]
            replies = await asyncio.gather(
                engine.reply(msg(question, "mine")),
                *(engine.reply(msg(text, f"o{i}")) for i, text in enumerate(texts)),
            )
            return replies[0].text
        finally:
            await engine.close()

    assert await reply_with(others) == await reply_with(0)


async def test_each_turn_reads_only_its_new_tokens(fp32: LoadedModel) -> None:
    """A memory of 3 exchanges slides from turn 4 on, moving the kept history's start;
    between turns (while the person types) the next prompt's beginning is read ahead,
    so every later turn reads only its own message (and the template around it)."""
    generator = greedy(fp32, max_new_tokens=8)
    engine = Engine(LocalBackend(generator), InProcessMemory(6, 600))
    scheduler = scheduler_of(engine)
    tokenizer = fp32.tokenizer
    texts = [f"Tell me one fact about the number {n}, please." for n in range(1, 10)]
    read: list[int] = []
    for text in texts:
        before = scheduler.read_tokens
        reply = await engine.reply(msg(text, "long"))
        assert reply.ok
        read.append(scheduler.read_tokens - before)
        await settle(engine)  # the person is typing
    assert scheduler.read_ahead_tokens > 0
    for turn, (text, count) in enumerate(zip(texts, read, strict=True)):
        if turn == 0:
            continue  # the system prompt and the first message: all new
        own = len(tokenizer.encode(text, add_special_tokens=False))
        assert count <= own + 8, (turn, count, own, read)
    await engine.close()


async def test_reading_ahead_never_brings_back_a_forgotten_conversation(
    fp32: LoadedModel,
) -> None:
    generator = greedy(fp32, max_new_tokens=8)
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
    scheduler = scheduler_of(engine)
    await engine.reply(msg("My secret number is 4417.", "secret"))
    await engine.reset(ConversationKey("test", "secret"))  # right after the reply
    await settle(engine)
    assert scheduler.store.peek(str(ConversationKey("test", "secret"))) is None
    await engine.close()


async def test_a_new_conversation_reads_the_system_prompt_from_the_shared_cache(
    fp32: LoadedModel,
) -> None:
    system = "You are a careful assistant. Answer in one short sentence, politely and exactly."
    generator = greedy(fp32, max_new_tokens=12, system_prompt=system)
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
    scheduler = scheduler_of(engine)
    await engine.reply(msg("What is the capital of Italy?", "one"))
    prompt = generator.prepare([], "What is the capital of France?")
    assert prompt.shared > len(fp32.tokenizer.encode(system)) // 2
    before = scheduler.read_tokens
    reply = await engine.reply(msg("What is the capital of France?", "two"))
    assert scheduler.read_tokens - before == len(prompt.input_ids) - prompt.shared
    assert reply.text == bare(generator, [], "What is the capital of France?").strip()
    await engine.close()
