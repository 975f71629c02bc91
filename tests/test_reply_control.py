"""Control over a reply, in the engine: Stop, Regenerate, feedback and daily token
allowances (the buttons and /usage that reach them: tests/test_discord*, test_slack*)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from bot import metrics
from bot.engine import NOT_YOURS, STOPPED_MARK, TOO_LATE, Engine
from bot.inference.loader import LoadedModel
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message
from bot.store.memory import InProcessMemory, Memory, RedisMemory
from bot.usage import Usage, describe_usage, limit_note
from tests.conftest import RedisTarget, greedy
from tests.scripted import ScriptedModel

KEY = ConversationKey("discord", "100")
OTHER = ConversationKey("discord", "200")


def said(text: str, who: str = "1", message_id: str = "", where: ConversationKey = KEY) -> Message:
    return Message(where, who, f"user{who}", text, message_id or f"m-{text}")


@pytest.fixture(params=["redis", "in-process"])
async def memory(request: pytest.FixtureRequest) -> AsyncIterator[Memory]:
    store: Memory
    if request.param == "redis":
        store = RedisMemory(request.getfixturevalue("redis_server").url, 20, 600)
    else:
        store = InProcessMemory(20, 600)
    yield store
    await store.close()


# --- Stop ---------------------------------------------------------------------------------


async def test_stop_ends_the_reply_at_once_and_memory_keeps_the_partial_text(
    memory: Memory,
) -> None:
    engine = Engine(LocalBackend(ScriptedModel("word " * 400, chunk=5, delay=0.01)), memory)
    stream = engine.stream(said("tell me everything"))
    chunks = aiter(stream)
    first = await anext(chunks)
    assert engine.live(KEY, "m-tell me everything") is stream
    assert engine.stop(KEY, "m-tell me everything")
    rest = [chunk async for chunk in chunks]
    assert rest[-1] == STOPPED_MARK
    reply = stream.reply
    assert reply is not None and reply.ok and reply.stopped
    assert reply.text.endswith(STOPPED_MARK) and len(reply.text) < 400 * 5 / 2
    stored = await memory.history(KEY)
    assert [t.role for t in stored] == ["user", "assistant"]
    assert stored[1].content == (first + "".join(rest[:-1])).strip()
    # Ended: nothing to stop any more.
    assert engine.live(KEY, "m-tell me everything") is None
    assert not engine.stop(KEY, "m-tell me everything")
    await engine.close()


async def test_a_stopped_row_leaves_the_scheduler_at_once(bundled: LoadedModel) -> None:
    """With the real model: the stopped reply's row is gone before the next message in
    another conversation is answered, which does not wait for the stopped one's tokens."""
    generator = greedy(bundled, max_new_tokens=400)
    scheduler = generator.scheduler
    assert scheduler is not None
    engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
    long = engine.stream(said("Write a very long story about a dragon.", message_id="long"))
    chunks = aiter(long)
    await anext(chunks)
    steps = scheduler.steps
    long.stop()
    async for _ in chunks:
        pass
    assert long.reply is not None and long.reply.stopped
    for _ in range(500):  # the worker drops it between steps
        if scheduler.running == 0:
            break
        await asyncio.sleep(0.01)
    assert scheduler.running == 0, "the stopped row left"
    assert scheduler.steps - steps <= 3, "within a step or two of the press"
    other = await engine.reply(said("Hi!", message_id="short", where=OTHER))
    assert other.ok and not other.stopped
    await engine.close()


async def test_stop_before_any_word_keeps_nothing() -> None:
    memory = InProcessMemory(20, 600)
    engine = Engine(LocalBackend(ScriptedModel("late", delay=0.01)), memory)
    stream = engine.stream(said("hello"))
    stream.stop()
    chunks = [chunk async for chunk in stream]
    assert chunks[-1] == STOPPED_MARK
    assert await memory.history(KEY) == []
    await engine.close()


# --- Regenerate ---------------------------------------------------------------------------


async def test_regenerate_replaces_the_last_reply_sampled(memory: Memory) -> None:
    replies = iter(["first answer", "second answer"])
    model = ScriptedModel(lambda _text: next(replies))
    engine = Engine(LocalBackend(model), memory, regenerate_temperature=0.8)
    await engine.reply(said("a question"))
    again = engine.regenerate(KEY, "m-a question", "1")
    text = "".join([chunk async for chunk in again])
    assert text == "second answer" and again.reply is not None and again.reply.ok
    assert model.temperatures == [None, 0.8]  # sampled: a greedy model would repeat itself
    assert model.inputs == ["a question", "a question"]
    assert model.histories[1] == []  # the earlier turns only, not the reply it replaces
    stored = await memory.history(KEY)
    assert [t.content for t in stored] == ["a question", "second answer"]
    await engine.close()


async def test_regenerate_is_refused_after_a_newer_message_or_to_another(
    memory: Memory,
) -> None:
    engine = Engine(LocalBackend(ScriptedModel("ok")), memory)
    await engine.reply(said("one"))
    refused = engine.regenerate(KEY, "m-one", "2")
    assert [chunk async for chunk in refused] == []
    assert refused.reply is not None and refused.reply.refused and refused.reply.text == NOT_YOURS
    await engine.reply(said("two", who="2"))
    late = engine.regenerate(KEY, "m-one", "1")
    assert [chunk async for chunk in late] == []
    assert late.reply is not None and late.reply.refused and late.reply.text == TOO_LATE
    assert [t.content for t in await memory.history(KEY)] == ["one", "ok", "two", "ok"]
    # Nothing stored (another process's memory, a restart without Redis): too late too.
    gone = Engine(LocalBackend(ScriptedModel()), InProcessMemory(20, 600))
    stream = gone.regenerate(KEY, "m-two", "2")
    assert [chunk async for chunk in stream] == []
    assert stream.reply is not None and stream.reply.text == TOO_LATE
    await engine.close()
    await gone.close()


async def test_a_regenerated_reply_can_be_stopped() -> None:
    memory = InProcessMemory(20, 600)
    model = ScriptedModel(lambda t: "short" if len(model.inputs) < 2 else "word " * 300,
                          chunk=5, delay=0.01)  # fmt: skip
    engine = Engine(LocalBackend(model), memory)
    await engine.reply(said("q"))
    again = engine.regenerate(KEY, "m-q", "1")
    chunks = aiter(again)
    await anext(chunks)
    assert engine.stop(KEY, "m-q")
    async for _ in chunks:
        pass
    assert again.reply is not None and again.reply.stopped
    stored = await memory.history(KEY)
    assert stored[1].content.startswith("word") and len(stored[1].content) < 1500
    await engine.close()


# --- feedback -----------------------------------------------------------------------------


def votes(platform: str, verdict: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "chatbot_feedback_total", {"platform": platform, "verdict": verdict}
        )
        or 0.0
    )


async def test_a_vote_counts_once_per_person_and_can_change(memory: Memory) -> None:
    engine = Engine(LocalBackend(ScriptedModel()), memory)
    up, down = votes("discord", "up"), votes("discord", "down")
    assert await engine.feedback(KEY, "r1", "1", "up")
    assert not await engine.feedback(KEY, "r1", "1", "up")  # the same vote again
    assert await engine.feedback(KEY, "r1", "2", "up")
    assert await engine.feedback(KEY, "r1", "1", "down")  # changed
    assert votes("discord", "up") - up == 2 and votes("discord", "down") - down == 1
    changed = metrics.REGISTRY.get_sample_value(
        "chatbot_feedback_changed_total", {"platform": "discord", "verdict": "up"}
    )
    assert changed and changed >= 1
    with pytest.raises(ValueError):
        await engine.feedback(KEY, "r1", "1", "meh")
    await engine.close()


# --- daily allowances ---------------------------------------------------------------------


async def test_the_daily_limit_holds_across_two_engines_on_one_redis(
    redis_target: RedisTarget,
) -> None:
    """Replies are counted to the person in Redis; past the allowance the first message
    gets one note with the reset time, later ones silence, on either replica."""
    stores = [RedisMemory(redis_target.url, 20, 600, cluster=redis_target.cluster) for _ in "ab"]
    a, b = (Engine(LocalBackend(ScriptedModel("x" * 40)), m, daily_tokens=30) for m in stores)
    first = await a.reply(said("hello there"))
    assert first.ok and first.text == "x" * 40
    used = await b.usage("discord", "1")
    assert used.used >= 10 and used.limit == 30  # 40 characters: ~10 tokens, and the prompt
    while not (await b.usage("discord", "1")).exhausted:
        assert (await b.reply(said("more"))).text == "x" * 40
    note = await b.reply(said("one more"))
    assert note.ok and "allowance of 30 tokens" in note.text and "UTC" in note.text
    for engine in (a, b):
        quiet = await engine.reply(said("and another"))
        assert quiet.silent and quiet.text == ""
    assert (await a.reply(said("not me", who="2"))).text == "x" * 40  # others go on
    # /forget keeps the counters (no text in them): no fresh allowance for the asking.
    await a.forget_user("discord", "1")
    assert (await b.usage("discord", "1")).exhausted
    assert (await b.reply(said("back"))).silent
    for engine in (a, b):
        await engine.close()


async def test_no_limit_counts_nothing_and_says_so() -> None:
    engine = Engine(LocalBackend(ScriptedModel()), InProcessMemory(20, 600))
    await engine.reply(said("hi"))
    usage = await engine.usage("discord", "1")
    assert usage == Usage(0, 0, usage.resets_at)
    assert "nothing is counted" in describe_usage(usage)
    await engine.close()


def test_usage_texts() -> None:
    now = datetime(2026, 12, 1, 21, 30, tzinfo=UTC)
    resets = datetime(2026, 12, 2, tzinfo=UTC)
    assert describe_usage(Usage(1200, 5000, resets), now) == (
        "Today you've used 1,200 of your 5,000 tokens (3,800 left); the count starts "
        "again at 00:00 UTC (in 2 h 30 min)."
    )
    assert "in 2 h 30 min" in limit_note(Usage(5000, 5000, resets), now)


async def test_the_limit_with_the_real_model_counts_its_tokens(bundled: LoadedModel) -> None:
    """The local backend counts with the model's tokenizer: prompt ids and reply."""
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=8)), InProcessMemory(20, 600),
                    daily_tokens=10_000)  # fmt: skip
    reply = await engine.reply(said("What is the capital of France?"))
    used = (await engine.usage("discord", "1")).used
    tokens = len(bundled.tokenizer(reply.text)["input_ids"])
    assert 20 < used <= 200 and used > tokens
    await engine.close()


async def test_usage_survives_no_store() -> None:
    """Redis away: messages are answered (nothing to count against)."""
    memory = RedisMemory("redis://127.0.0.1:1/0", 20, 600, timeout=0.2)
    engine = Engine(LocalBackend(ScriptedModel("fine")), memory, daily_tokens=5)
    assert (await engine.reply(said("hi"))).text == "fine"
    await engine.close()


async def test_loop_not_blocked_while_stopping() -> None:
    """Stop from another task while the reply waits on a slow model."""
    engine = Engine(LocalBackend(ScriptedModel("a b c " * 50, chunk=2, delay=0.05)),
                    InProcessMemory(20, 600))  # fmt: skip
    stream = engine.stream(said("slow"))

    async def press() -> None:
        await asyncio.sleep(0.1)
        assert engine.stop(KEY, "m-slow")

    pressing = asyncio.create_task(press())
    text = "".join([chunk async for chunk in stream])
    await pressing
    assert text.endswith(STOPPED_MARK)
    await engine.close()


async def test_kept_says_which_replies_have_something_for_the_buttons() -> None:
    engine = Engine(LocalBackend(ScriptedModel("fine")), InProcessMemory(20, 600), daily_tokens=1)
    assert (await engine.reply(said("hello"))).kept
    assert not (await engine.reply(said("   "))).kept  # a note, not an answer
    assert not (await engine.reply(said("again"))).kept  # the daily limit's note
    await engine.close()


async def test_a_regenerate_pressed_during_another_leaves_the_live_one_stoppable() -> None:
    model = ScriptedModel(lambda t: "word " * 300 if len(model.inputs) > 1 else "short",
                          chunk=5, delay=0.01)  # fmt: skip
    engine = Engine(LocalBackend(model), InProcessMemory(20, 600))
    await engine.reply(said("q"))
    running = engine.regenerate(KEY, "m-q", "1")
    chunks = aiter(running)
    await anext(chunks)
    meanwhile = engine.regenerate(KEY, "m-q", "2")  # Bob presses it too
    assert engine.live(KEY, "m-q") is running
    assert engine.stop(KEY, "m-q")
    async for _ in chunks:
        pass
    assert running.reply is not None and running.reply.stopped
    assert [c async for c in meanwhile] == []
    assert meanwhile.reply is not None and meanwhile.reply.refused
    await engine.close()


async def test_regenerate_samples_on_the_real_model_and_greedy_rows_stay_greedy(
    bundled: LoadedModel,
) -> None:
    """The bundled model answers greedily by default; Regenerate's row samples at its
    own temperature (seeded: the same run gives the same words), beside a greedy row
    that writes what it writes alone."""
    memory = InProcessMemory(20, 600)
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=24, seed=7)), memory)
    question = said("Tell me about the moon.", message_id="q")
    first = await engine.reply(question)
    alone = await engine.reply(said("What is 2 + 2?", message_id="solo", where=OTHER))
    await engine.reset(OTHER)
    again = engine.regenerate(KEY, "q", "1")
    beside = asyncio.create_task(engine.reply(said("What is 2 + 2?", message_id="b", where=OTHER)))
    text = "".join([chunk async for chunk in again])
    assert again.reply is not None and again.reply.ok and again.reply.kept
    assert text.strip() != first.text.strip(), "sampled, not the greedy reply again"
    assert (await beside).text == alone.text, "the greedy row beside it is unchanged"
    assert (await memory.history(KEY))[1].content == text.strip()
    await engine.close()


async def test_messages_queued_in_one_conversation_cannot_overspend() -> None:
    """Ten messages sent together in one conversation all pass the check on arrival;
    each is checked again when its turn comes, after the ones before it are counted."""
    engine = Engine(LocalBackend(ScriptedModel("x" * 200)), InProcessMemory(20, 600),
                    daily_tokens=100)  # fmt: skip
    replies = await asyncio.gather(*(engine.reply(said(f"m{i}")) for i in range(10)))
    answered = [r for r in replies if r.text == "x" * 200]
    assert len(answered) == 2  # 50+ tokens each: the second spends the rest
    assert sum("allowance" in r.text for r in replies) == 1
    assert sum(r.silent for r in replies) == 7
    await engine.close()


async def test_a_reply_whose_reader_leaves_at_the_end_is_still_counted() -> None:
    engine = Engine(LocalBackend(ScriptedModel("y" * 400, chunk=50)), InProcessMemory(20, 600),
                    daily_tokens=10_000)  # fmt: skip
    stream = engine.stream(said("long"))
    seen = ""
    async for chunk in stream:
        seen += chunk
        if len(seen) >= 400:
            break
    await stream.aclose()
    for _ in range(100):  # the inner generators are closed by the loop's finalizer
        if (await engine.usage("discord", "1")).used:
            break
        await asyncio.sleep(0.01)
    assert (await engine.usage("discord", "1")).used >= 100
    await engine.close()
