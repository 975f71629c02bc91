"""The step scheduler's rules, counted in steps on a tiny random Llama (no timing):
no prompt starves, retirement comes before admission, a shutdown stores nothing for
queued rows, stale slot contents never reach attention, and each sampled row has
its own random stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bot.inference.kvcache import install
from bot.inference.scheduler import Row, Scheduler, ShutdownError

VOCAB = 512


class IdsTokenizer:
    """Each token id as a word: every token ends a word, so text comes at once."""

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(f"{i} " for i in ids)


class Gated(torch.nn.Module):
    """The model, with a hook called before each forward pass (on the worker)."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.before: Callable[[], None] = lambda: None
        self.sizes: list[int] = []  # tokens each forward pass read

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, **kwargs: Any) -> Any:
        self.sizes.append(int(kwargs["input_ids"].shape[-1]))
        self.before()
        return self.inner(**kwargs)


@pytest.fixture(scope="module")
def tiny() -> Gated:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config)
    model.eval()  # type: ignore[no-untyped-call]
    assert install(model) is None
    return Gated(model)


class Outcome:
    """What one row handed back: its text pieces, the step of its first token, the end."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.pieces: list[str] = []
        self.first_step: int | None = None
        self.done = threading.Event()
        self.text: str | None = None
        self.error: BaseException | None = None

    def sink(self, piece: str) -> None:
        if self.first_step is None:
            self.first_step = self.scheduler.steps
        self.pieces.append(piece)

    def finish(self, text: str | None, error: BaseException | None) -> None:
        self.text, self.error = text, error
        self.done.set()

    def tokens(self) -> list[int]:
        return [int(t) for t in "".join(self.pieces).split()]


def submit(
    scheduler: Scheduler, prompt: list[int], key: str = "", seed: int | None = None
) -> tuple[Row, Outcome]:
    outcome = Outcome(scheduler)
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    row = Row(prompt, key, outcome.sink, threading.Event(), outcome.finish, generator=generator)
    scheduler.submit(row)
    return row, outcome


def make(model: Gated, **options: Any) -> Scheduler:
    values: dict[str, Any] = {"max_new_tokens": 8, "capacity": 2048, "eos": set()}
    values.update(options)
    return Scheduler(model, IdsTokenizer(), **values)


def prompt(length: int, start: int = 10) -> list[int]:
    return [(start + i) % (VOCAB - 20) + 10 for i in range(length)]


def wait(outcome: Outcome, seconds: float = 60) -> None:
    assert outcome.done.wait(seconds), "the row never ended"


def test_a_long_prompt_is_not_starved_by_a_stream_of_short_ones(tiny: Gated) -> None:
    scheduler = make(tiny, max_new_tokens=2, max_rows=16, step_tokens=32)
    count = [0]

    def feed() -> None:
        # Before every step two new short messages arrive: more prompt tokens than a
        # step reads (until a bound on their number).
        for _ in range(2):
            if count[0] < 300:
                count[0] += 1
                submit(scheduler, prompt(20, start=count[0]))

    tiny.before = feed
    try:
        submit(scheduler, prompt(20))
        time.sleep(0.05)
        started = scheduler.steps
        _, long = submit(scheduler, prompt(600, start=500))
        wait(long)
    finally:
        tiny.before = lambda: None
        scheduler.close(10)
    assert long.first_step is not None and long.error is None
    waited = long.first_step - started
    # Aging: after at most 600 / budget steps the long prompt goes first; then it
    # needs about as many again to be read. Shortest-first alone never reached it.
    budget = 32 // 4
    assert waited <= 2 * (600 // budget) + 10, waited
    assert count[0] < 300, "short messages kept arriving all along"


def test_a_short_message_behind_a_long_one_starts_in_a_step_of_its_own_size(
    tiny: Gated,
) -> None:
    """Head of line: a one-line message arriving while a long prompt is read has its
    first token from the next step, and that step reads its prompt only (no part of
    the long one, which would make that first token wait longer than alone)."""
    scheduler = make(tiny, max_new_tokens=2, max_rows=4, step_tokens=64)
    sizes = tiny.sizes
    sizes.clear()
    arrived: list[int] = []
    short: list[Outcome] = []

    def before() -> None:
        if len(sizes) == 3:  # the long prompt's third chunk: the short one arrives
            arrived.append(scheduler.steps)
            short.append(submit(scheduler, prompt(20, start=300))[1])

    tiny.before = before
    try:
        _, long = submit(scheduler, prompt(1000, start=500))
        wait(long)
        wait(short[0])
    finally:
        tiny.before = lambda: None
        scheduler.close(10)
    first = short[0].first_step
    assert first is not None
    # The step in flight when it came, then its own: 20 tokens, not a full 64.
    assert first - arrived[0] <= 2, (first, arrived)
    assert sizes[first - 1] == 20, sizes[:8]
    assert max(sizes) == 64  # the long prompt still reads in full steps otherwise
    assert long.error is None and short[0].error is None


def test_a_stopped_row_leaves_before_the_next_arrivals_join(tiny: Gated) -> None:
    # The conversation's next message, arriving while its stopped predecessor still
    # holds a place, finds that one's cache: the stopped row left first.
    scheduler = make(tiny, max_new_tokens=500, max_rows=2)
    entered, release = threading.Event(), threading.Event()
    hold = threading.Event()

    def gate() -> None:
        if hold.is_set():
            hold.clear()
            entered.set()
            release.wait(10)

    tiny.before = gate
    try:
        first_prompt = prompt(40)
        first, first_out = submit(scheduler, first_prompt, key="a")
        while first_out.first_step is None:
            time.sleep(0.01)
        hold.set()
        assert entered.wait(10)
        # The worker is inside a step: the reader goes away, the next message comes.
        first.stop.set()
        _, second = submit(scheduler, [*first_prompt, 7, 8, 9], key="a")
        steps_before = scheduler.steps
        release.set()
        while second.first_step is None:
            time.sleep(0.01)
    finally:
        tiny.before = lambda: None
        release.set()
        scheduler.close(10)
    assert scheduler.reused_tokens >= len(first_prompt)
    # The held step, then the second row's 4 new tokens (3 + the last read again).
    assert second.first_step is not None and second.first_step - steps_before <= 2
    assert first_out.error is None and first_out.text  # what it wrote before it stopped


def test_shutdown_ends_queued_rows_as_failures_not_replies(tiny: Gated) -> None:
    scheduler = make(tiny, max_new_tokens=100_000, max_rows=1)
    _, running = submit(scheduler, prompt(10))
    while running.first_step is None:
        time.sleep(0.01)
    queued = [submit(scheduler, prompt(10, start=s))[1] for s in (100, 200)]
    assert scheduler.close(10)
    for outcome in [running, *queued]:
        wait(outcome, 5)
        assert outcome.text is None and isinstance(outcome.error, ShutdownError)


def test_stale_slot_contents_never_reach_attention(tiny: Gated) -> None:
    def run(poison: bool) -> list[int]:
        scheduler = make(tiny, max_new_tokens=12, max_rows=2)
        try:
            _, earlier = submit(scheduler, prompt(300), key="earlier")
            wait(earlier)
            if poison:  # what a previous row may leave in fp16/bf16: NaN and Inf
                scheduler._pool.keys[:, 0] = float("nan")
                scheduler._pool.values[:, 0] = float("inf")
            # A short row takes slot 0 beside a long one: the batched attention reads
            # slot 0 up to the long row's length.
            _, short = submit(scheduler, prompt(8, start=3))
            _, long = submit(scheduler, prompt(200, start=7))
            wait(short)
            wait(long)
            return short.tokens() + long.tokens()
        finally:
            scheduler.close(10)

    assert run(poison=True) == run(poison=False)


def sampled(tiny: Gated, others: int, seed: int | None) -> list[int]:
    scheduler = make(tiny, max_new_tokens=24, max_rows=16, temperature=1.0, seed=seed)
    try:
        rows = [submit(scheduler, prompt(30, start=400 + i))[1] for i in range(others)]
        _, mine = submit(scheduler, prompt(30), seed=None if seed is not None else 1234)
        for outcome in [*rows, mine]:
            wait(outcome)
        return mine.tokens()
    finally:
        scheduler.close(10)


@pytest.mark.parametrize("seed", [None, 7])
def test_a_sampled_row_does_not_depend_on_its_neighbours(tiny: Gated, seed: int | None) -> None:
    # seed=None: the row brings its own generator; seed=7: SEED seeds each row from
    # its prompt. Either way, alone or beside 1, 3 or 8 others, the same tokens.
    alone = sampled(tiny, 0, seed)
    assert len(alone) == 24
    for others in (1, 3, 8):
        assert sampled(tiny, others, seed) == alone, others


def test_a_cache_that_cannot_be_kept_still_ends_its_row(tiny: Gated) -> None:
    """Copying a finished row's cache fails (out of memory, say): the reader still
    gets its reply, the place is freed, and the next row runs."""
    scheduler = make(tiny, max_new_tokens=4, max_rows=1)

    def refuse(_key: str, _entry: Any) -> None:
        raise MemoryError("no room for the copy")

    scheduler.store.put = refuse  # type: ignore[method-assign,assignment]
    try:
        _, first = submit(scheduler, prompt(20), key="a")
        wait(first, 10)
        assert first.error is None and first.text and len(first.tokens()) == 4
        _, second = submit(scheduler, prompt(20, start=50), key="b")
        wait(second, 10)
        assert second.error is None and scheduler.running == 0
    finally:
        scheduler.close(10)


def test_close_drops_what_was_left_to_read_ahead(tiny: Gated) -> None:
    scheduler = make(tiny, max_new_tokens=100_000, max_rows=4)
    _, running = submit(scheduler, prompt(10))
    while running.first_step is None:
        time.sleep(0.01)
    for n in range(30):
        scheduler.prefetch(f"c{n}", prompt(500, start=n), scheduler.forgets)
    assert scheduler.close(10)
    wait(running, 5)
    # At most what one step could read before the close was seen: not 30 prompts.
    assert scheduler.read_ahead_tokens <= 2 * 500


def test_a_row_keeps_its_slot_when_another_ends(tiny: Gated) -> None:
    """Ending a row copies no other row's cache: the rows still running stay in their
    slots (the last one used to move into the freed slot, a copy of its whole cache),
    and their tokens are those they get alone."""

    def long_tokens(with_short: bool) -> tuple[list[int], list[int]]:
        scheduler = make(tiny, max_new_tokens=40, max_rows=4)
        try:
            slots: list[int] = []
            short_row = None
            if with_short:
                short_row, short = submit(scheduler, prompt(12), key="short")
            long_row, long = submit(scheduler, prompt(30, start=200), key="long")

            def watch() -> None:
                if long_row.slot < 0:
                    return  # not admitted yet (the short row's first step came first)
                slots.append(long_row.slot)
                if short_row is not None and len(slots) == 5:
                    short_row.stop.set()  # its reader goes away: it ends first

            tiny.before = watch
            wait(long)
            if with_short:
                wait(short)
            return long.tokens(), slots
        finally:
            tiny.before = lambda: None
            scheduler.close(10)

    beside, slots = long_tokens(with_short=True)
    alone, _ = long_tokens(with_short=False)
    assert beside == alone
    assert len(set(slots)) == 1, slots  # never moved, though the short row ended first
