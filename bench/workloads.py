"""The bench's workloads. Each drives one system through its public API and returns
what it measured; every loop here is bounded in count and in time.

The engine is driven only through `Engine.from_settings(...)`, `engine.stream(...)` and
`engine.close()`, so the bench measures whichever engine is in the tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import usable_cpus
from bot.engine import Engine
from bot.inference.backend import Backend
from bot.messages import ConversationKey, Message
from bot.settings import Settings
from bot.store.memory import Memory

log = logging.getLogger("bench")


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
    return ordered[index]


@dataclass
class Run:
    """One system at one concurrency in a closed loop: what the chart and ratios use."""

    system: str
    concurrency: int
    dtype: str = ""
    threads: int = 0
    messages: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    loop_lag_p99_ms: float | None = None
    peak_rss_mb: float = 0.0
    planned: int = 0  # messages the workload holds; more than `messages` when cut short
    cut_short: bool = False  # stopped at its time budget

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "dtype": self.dtype,
            "threads": self.threads,
            "messages": self.messages,
            "planned": self.planned or self.messages,
            "cut_short": self.cut_short,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else 0.0,
            "messages_per_s": round(self.messages / self.wall_s, 4) if self.wall_s else 0.0,
            "latency_p50_s": round(percentile(self.latencies_s, 50), 2),
            "latency_p95_s": round(percentile(self.latencies_s, 95), 2),
            "ttft_p50_s": round(percentile(self.ttft_s, 50), 3),
            "ttft_p95_s": round(percentile(self.ttft_s, 95), 3),
            "loop_lag_p99_ms": self.loop_lag_p99_ms,
            "peak_rss_mb": round(self.peak_rss_mb),
        }


@dataclass
class Setup:
    """How to build an engine for a workload, and what to write next to its figures."""

    # A new backend for each engine: closing an engine closes its backend (the step
    # scheduler a Generator owns), and no cache should outlive a workload.
    make_backend: Callable[[], Backend]
    settings: Settings
    memory: Callable[[int], Memory]  # a fresh store keeping at most this many turns
    count_tokens: Callable[[str], int]
    dtype: str
    threads: int

    def engine(self, max_turns: int | None = None) -> Engine:
        memory = self.memory(max_turns or self.settings.memory_max_turns)
        return Engine.from_settings(self.make_backend(), memory, self.settings)

    async def start(self, max_turns: int | None = None) -> Engine:
        """An engine that has answered one short message: one-off costs of a new
        engine (threads, buffers) are not charged to the first figure measured."""
        engine = self.engine(max_turns)
        try:
            await answered(engine, new_key("warm"), "Hi!")
        except BaseException:
            await engine.close()
            raise
        return engine

    def tags(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "threads": self.threads}


_keys = itertools.count()


def new_key(label: str) -> ConversationKey:
    """A conversation nobody has used: no cache or memory is shared by accident."""
    return ConversationKey("bench", f"{label}-{os.getpid()}-{next(_keys)}")


@dataclass
class Timed:
    ttft_s: float | None  # None: no text came before it ended
    total_s: float
    text: str
    ok: bool
    truncated_input: bool


async def timed(
    engine: Engine,
    key: ConversationKey,
    text: str,
    since: float | None = None,
    firsts: list[float] | None = None,
) -> Timed:
    """One message through `engine.stream`, timed from `since` (default: now).

    Where the engine says it cut the message to fit, that note comes first, at once:
    the first token is then the next chunk, the model's first text. `firsts` (when
    given) receives the first two chunks' times as they come: a caller that cuts the
    reply still knows whether it had begun."""
    begin = time.perf_counter() if since is None else since
    firsts = [] if firsts is None else firsts
    parts: list[str] = []
    stream = engine.stream(Message(key, "bench", "bench", text))
    async for chunk in stream:
        if len(firsts) < 2 and chunk:
            firsts.append(time.perf_counter() - begin)
        parts.append(chunk)
    reply = getattr(stream, "reply", None)  # the engine's whole reply, where it keeps one
    truncated = bool(getattr(reply, "truncated_input", False))
    return Timed(
        firsts[1] if truncated and len(firsts) > 1 else firsts[0] if firsts else None,
        time.perf_counter() - begin,
        "".join(parts),
        bool(getattr(reply, "ok", True)),
        truncated,
    )


async def answered(
    engine: Engine, key: ConversationKey, text: str, since: float | None = None
) -> Timed:
    """`timed`, for workloads that never overload the engine: a failed reply (an
    apology comes at once) would pass for a fast one, so it stops the bench."""
    result = await timed(engine, key, text, since)
    if not result.ok:
        raise RuntimeError(f"the engine did not answer {text[:40]!r}: {result.text[:200]!r}")
    return result


# --- measuring -------------------------------------------------------------------------


@contextmanager
def peak_rss(run: Run) -> Iterator[None]:
    """Peak resident memory during the block (Linux: reset the high-water mark first)."""
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    yield
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                run.peak_rss_mb = int(line.split()[1]) / 1024


class LagProbe:
    """Measures how late the event loop wakes a 5 ms sleeper."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            self.lags.append(time.perf_counter() - before - 0.005)

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        return round(percentile(self.lags, 99) * 1000, 2)


@contextlib.asynccontextmanager
async def probed(into: dict[str, Any]) -> AsyncIterator[None]:
    """Loop lag p99 during the block, stored as into["loop_lag_p99_ms"]."""
    probe = LagProbe()
    probe.start()
    try:
        yield
    finally:
        into["loop_lag_p99_ms"] = await probe.stop()


async def finish(tasks: list[asyncio.Task[Any]], within_s: float) -> int:
    """Wait for `tasks` up to `within_s` seconds; cancel the rest. Returns how many were cut."""
    if not tasks:
        return 0
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, within_s))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=30)  # let the engine free their rows
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("a message failed in the bench", exc_info=task.exception())
    return len(pending)


class RedisServer:
    """A throwaway redis-server on a free loopback port (None where it is not installed)."""

    def __init__(self, binary: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)

    @classmethod
    def start(cls) -> RedisServer | None:
        binary = shutil.which("redis-server")
        return cls(binary) if binary else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the seed's loop ---------------------------------------------------------------------


def seed_loop(
    loaded: Any,
    settings: Settings,
    chats: list[list[str]],
    budget_s: float,
    label: str = "seed loop",
) -> Run:
    """The seed's chatbot loop: one `model.generate` per message, one message after
    another, history kept in a list, no streaming, no batching.

    It serves `len(chats)` people at once as such a loop would: each person's next
    message arrives when their previous reply is done, and messages wait their turn
    in arrival order; a reply's latency counts that wait. It starts no message past
    `budget_s`: its tokens/s and messages/s hold for the part that ran (one message at
    a time, the rate is steady), and its latencies are those of the first messages.
    """
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    run = Run(label, len(chats), dtype=dtype_name(model), threads=torch.get_num_threads())
    run.planned = sum(len(turns) for turns in chats)
    kwargs = greedy_kwargs(settings)
    system = {"role": "system", "content": settings.system_prompt}
    histories: list[list[dict[str, str]]] = [[system] for _ in chats]
    waiting = deque((0.0, number, 0) for number in range(len(chats)))
    generation_times = []
    # Warm, as the bot is before it is measured: the first generate pays one-off costs.
    warm = tokenizer.apply_chat_template(
        [system, {"role": "user", "content": "Warm up."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    on_own_thread(
        lambda: model.generate(
            **warm, pad_token_id=tokenizer.pad_token_id, **{**kwargs, "max_new_tokens": 2}
        )
    )
    started = time.perf_counter()
    with peak_rss(run):
        while waiting:
            if time.perf_counter() - started > budget_s:
                run.cut_short = True
                break
            arrived, number, turn = waiting.popleft()
            history = histories[number]
            history.append({"role": "user", "content": chats[number][turn]})
            begin = time.perf_counter()
            inputs = tokenizer.apply_chat_template(
                history, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            output = on_own_thread(
                functools.partial(
                    model.generate, **inputs, pad_token_id=tokenizer.pad_token_id, **kwargs
                )
            )
            new = output[0][inputs["input_ids"].shape[1] :]
            history.append(
                {"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)}
            )
            done = time.perf_counter() - started
            generation_times.append(time.perf_counter() - begin)
            run.latencies_s.append(done - arrived)
            run.ttft_s.append(done - arrived)  # nothing is shown before the whole reply
            run.tokens += len(new)
            run.messages += 1
            if turn + 1 < len(chats[number]):
                waiting.append((done, number, turn + 1))
    run.wall_s = time.perf_counter() - started
    # The loop runs generate on the event loop's thread: it is blocked for each one.
    run.loop_lag_p99_ms = round(percentile(generation_times, 99) * 1000, 1)
    return run


def greedy_kwargs(settings: Settings) -> dict[str, Any]:
    """`generate` arguments for a greedy reply as long as the bot's."""
    return {
        "max_new_tokens": settings.max_new_tokens,
        "repetition_penalty": settings.repetition_penalty,
        "do_sample": False,
        "num_beams": 1,
        # Unset what the model's generation config may carry for sampling (no warnings).
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }


def dtype_name(model: Any) -> str:
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return "?"


# --- this bot's engine ---------------------------------------------------------------------


async def closed_loop(setup: Setup, chats: list[list[str]], budget_s: float, label: str) -> Run:
    """`len(chats)` conversations at once, each sending its next message when the
    previous reply is complete, as an adapter would."""
    engine = await setup.start()
    try:
        run = Run(label, len(chats), **setup.tags())
        run.planned = sum(len(turns) for turns in chats)

        async def converse(turns: list[str]) -> None:
            key = new_key(f"closed{len(chats)}")
            for text in turns:
                result = await answered(engine, key, text)
                run.latencies_s.append(result.total_s)
                run.ttft_s.append(result.ttft_s or result.total_s)
                run.tokens += setup.count_tokens(result.text)
                run.messages += 1

        lag: dict[str, Any] = {}
        with peak_rss(run):
            async with probed(lag):
                started = time.perf_counter()
                tasks = [asyncio.create_task(converse(turns)) for turns in chats]
                run.cut_short = await finish(tasks, budget_s) > 0
                run.wall_s = time.perf_counter() - started
        for task in tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                raise error  # a failed reply is a bench failure, not a figure
        run.loop_lag_p99_ms = lag["loop_lag_p99_ms"]
    finally:
        await engine.close()
    return run


def arrival_times(count: int, rate: float, window_s: float, seed: int) -> list[float]:
    """Poisson arrivals at `rate` per second: at most `count`, none after `window_s`,
    at least two. The same seed gives the same pattern at every rate, scaled."""
    rng = random.Random(seed)
    times: list[float] = []
    now = 0.0
    while len(times) < count:
        now += rng.expovariate(1.0) / rate
        if now > window_s and len(times) >= 2:
            break
        times.append(now)
    if times[-1] > window_s:  # a rate too low for two arrivals in the window: compress
        times = [t * window_s / times[-1] for t in times]
    return times


async def open_loop(
    setup: Setup,
    texts: list[str],
    rate: float,
    count: int,
    window_s: float,
    drain_s: float,
    seed: int,
    late_s: float = 10.0,
) -> dict[str, Any]:
    """Messages from new conversations arriving at random (Poisson) at `rate` per
    second, whether or not earlier replies are done. Time to first token counts from
    each message's arrival. Replies still running `drain_s` after the last arrival are
    stopped; one cut before its first token counts with the time it waited (a lower
    bound). Messages the engine refuses (busy) are counted apart, not as fast replies.
    `no_first_token`: messages with no first token within `late_s` (cut while still
    waiting and refused ones included)."""
    engine = await setup.start()
    try:
        schedule = arrival_times(count, rate, window_s, seed)
        ttfts: list[float] = []
        latencies: list[float] = []
        tokens = 0
        ends: list[float] = []
        running: dict[int, tuple[float, list[float]]] = {}  # arrival, first chunks' times
        refused: list[int] = []
        started = time.perf_counter()

        async def arrive(number: int, at: float) -> None:
            nonlocal tokens
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            since, firsts = started + at, list[float]()
            running[number] = (since, firsts)
            text = texts[number % len(texts)]
            result = await timed(engine, new_key("open"), text, since, firsts)
            running.pop(number)
            if not result.ok:  # "busy" (or a failure) comes at once: not a fast reply
                refused.append(number)
                return
            ttfts.append(result.ttft_s or result.total_s)
            latencies.append(result.total_s)
            tokens += setup.count_tokens(result.text)
            ends.append(time.perf_counter())

        out: dict[str, Any] = {}
        async with probed(out):
            tasks = [asyncio.create_task(arrive(n, at)) for n, at in enumerate(schedule)]
            unfinished = await finish(tasks, schedule[-1] + drain_s)
            deadline = time.perf_counter()
        # Cut replies count too (dropping them would flatter p95): with their first
        # token where it came (these short texts are never cut to fit), else the wait.
        begun = [firsts[0] for _, firsts in running.values() if firsts]
        waiting = [deadline - since for since, firsts in running.values() if not firsts]
        cut = [deadline - since for since, _ in running.values()]
    finally:
        await engine.close()
    span = (max(ends) if ends else deadline) - started - schedule[0]
    every = ttfts + begun + waiting
    late = sum(t > late_s for t in ttfts + begun) + len(waiting) + len(refused)
    out.update(
        rate_per_s=round(rate, 4),
        arrivals=len(schedule),
        arrival_span_s=round(schedule[-1], 2),
        finished=len(ttfts),
        unfinished=unfinished,
        refused=len(refused),
        cut_waiting=len(waiting),
        ttft_p50_s=round(percentile(every, 50), 3),
        ttft_p95_s=round(percentile(every, 95), 3),
        ttft_max_s=round(max(every, default=0.0), 3),
        late_s=late_s,
        no_first_token=late,
        latency_p95_s=round(percentile(latencies + cut, 95), 2),
        tokens=tokens,
        tokens_per_s=round(tokens / span, 1) if span > 0 else 0.0,
        **setup.tags(),
    )
    return out


async def long_history(
    setup: Setup, paste: str, questions: list[str], budget_s: float
) -> dict[str, Any]:
    """A conversation whose first turn is a long pasted text (stored through the
    engine, as a real turn), then short questions; each question is also asked in a
    fresh conversation, alternately, so that drift touches both alike."""
    engine = await setup.start(max_turns=2 * len(questions) + 2)
    try:
        key = new_key("paste")
        out: dict[str, Any] = {"paste_chars": len(paste), **setup.tags()}
        after: list[float] = []
        fresh: list[float] = []
        async with probed(out):
            first = await answered(engine, key, paste)
            out.update(
                paste_ttft_s=round(first.ttft_s or first.total_s, 3),
                paste_reply_s=round(first.total_s, 2),
                paste_truncated=first.truncated_input,
            )
            started = time.perf_counter()  # the budget is the questions': one at least
            for question in questions:
                if after and time.perf_counter() - started > budget_s:
                    out["cut_short"] = True
                    break
                result = await answered(engine, key, question)
                after.append(result.ttft_s or result.total_s)
                result = await answered(engine, new_key("fresh"), question)
                fresh.append(result.ttft_s or result.total_s)
    finally:
        await engine.close()
    out.update(
        **first_tokens(after_paste=after, fresh=fresh),
    )
    return out


def first_tokens(**series: list[float]) -> dict[str, Any]:
    """`<name>_ttft_s` (each time to first token) and `<name>_ttft_median_s` per series."""
    out: dict[str, Any] = {}
    for name, values in series.items():
        out[f"{name}_ttft_s"] = [round(t, 3) for t in values]
        out[f"{name}_ttft_median_s"] = round(statistics.median(values), 3) if values else None
    return out


async def head_of_line(
    setup: Setup, long_text: str, question: str, delay_s: float, reps: int, budget_s: float
) -> dict[str, Any]:
    """A one-line question arriving `delay_s` after another conversation's long
    message, against the same question alone (alternately, `reps` times each)."""
    engine = await setup.start()
    try:
        alone: list[float] = []
        behind: list[float] = []
        long_first: list[float] = []
        out: dict[str, Any] = {"long_chars": len(long_text), "delay_s": delay_s, **setup.tags()}
        started = time.perf_counter()
        async with probed(out):
            for _ in range(reps):
                if alone and time.perf_counter() - started > budget_s:
                    out["cut_short"] = True
                    break
                result = await answered(engine, new_key("alone"), question)
                alone.append(result.ttft_s or result.total_s)
                long_task = asyncio.create_task(timed(engine, new_key("long"), long_text))
                await asyncio.sleep(delay_s)
                result = await answered(engine, new_key("behind"), question)
                behind.append(result.ttft_s or result.total_s)
                long_result = await long_task
                long_first.append(long_result.ttft_s or long_result.total_s)
                out["long_truncated"] = long_result.truncated_input
    finally:
        await engine.close()
    out.update(
        **first_tokens(alone=alone, behind_long=behind),
        # Above delay_s: the question came while the long prompt was still being read.
        long_ttft_s=[round(t, 3) for t in long_first],
    )
    return out


async def turn_by_turn(
    setup: Setup, turns: list[str], reps: int, budget_s: float, typing_s: float = 0.0
) -> dict[str, Any]:
    """Time to first token at each turn of one conversation, with the memory as
    configured (MEMORY_MAX_TURNS: from turn 11 on, by default, the oldest exchange
    goes at every turn) and `typing_s` between a reply's end and the next message (a
    person typing: the engine is idle meanwhile, as between real turns); with several
    repetitions, the fastest at each turn."""
    engine = await setup.start()
    try:
        runs: list[list[float]] = []
        out: dict[str, Any] = {**setup.tags()}
        started = time.perf_counter()
        async with probed(out):
            for _ in range(reps):
                if runs and time.perf_counter() - started > budget_s:
                    break
                key = new_key("turns")
                firsts: list[float] = []
                for number, text in enumerate(turns):
                    if number and typing_s:
                        await asyncio.sleep(typing_s)
                    if time.perf_counter() - started > budget_s:
                        out["cut_short"] = True
                        break
                    result = await answered(engine, key, text)
                    firsts.append(result.ttft_s or result.total_s)
                if firsts:
                    runs.append(firsts)
    finally:
        await engine.close()
    # Each turn: the fastest of the repetitions that reached it.
    reached = max((len(r) for r in runs), default=0)
    by_turn = [min(r[n] for r in runs if len(r) > n) for n in range(reached)]
    out.update(
        repetitions=len(runs),
        typing_s=typing_s,
        ttft_by_turn_s=[round(t, 3) for t in by_turn],
        at={str(n): round(by_turn[n - 1], 3) for n in (1, 5, 10, 20, 30) if n <= len(by_turn)},
    )
    return out


async def single_vs_bare(
    setup: Setup, loaded: Any, text: str, repeats: int, budget_s: float
) -> tuple[float, float]:
    """Median wall time of one message through the engine and of a bare
    `model.generate` of the same chat, measured alternately so that drift in the
    machine's speed touches both alike."""
    engine = await setup.start()
    try:
        tokenizer = loaded.tokenizer
        chat = [
            {"role": "system", "content": setup.settings.system_prompt},
            {"role": "user", "content": text},
        ]
        inputs = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        inputs = {name: value.to(loaded.model.device) for name, value in inputs.items()}
        kwargs = greedy_kwargs(setup.settings)
        bare: list[float] = []
        through_engine: list[float] = []
        started = time.perf_counter()
        for _ in range(repeats):
            if bare and time.perf_counter() - started > budget_s:
                break
            begin = time.perf_counter()
            on_own_thread(
                lambda: loaded.model.generate(
                    **inputs, pad_token_id=tokenizer.pad_token_id, **kwargs
                )
            )
            bare.append(time.perf_counter() - begin)
            result = await answered(engine, new_key("single"), text)
            through_engine.append(result.total_s)
    finally:
        await engine.close()
    return statistics.median(through_engine), statistics.median(bare)


# --- the others ----------------------------------------------------------------------------


def llama_cpp_run(
    gguf: Callable[[], Path], chats: list[list[str]], settings: Settings, budget_s: float
) -> Run | None:
    """The peer: llama-cpp-python on the same GGUF file (`gguf()`, looked up only when
    llama_cpp imports), one message after another: one stream. None: not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    threads = usable_cpus()
    llm: Any = Llama(model_path=str(gguf()), n_ctx=4096, n_threads=threads, verbose=False)
    run = Run("llama-cpp-python", 1, dtype="Q4_1 gguf", threads=threads or 0)
    run.planned = sum(len(turns) for turns in chats)
    started = time.perf_counter()
    with peak_rss(run):
        for turns in chats:
            history = [{"role": "system", "content": settings.system_prompt}]
            for text in turns:
                if time.perf_counter() - started > budget_s:
                    run.cut_short = True
                    break
                history.append({"role": "user", "content": text})
                begin = time.perf_counter()
                first = None
                pieces = []
                for part in llm.create_chat_completion(
                    messages=history,
                    max_tokens=settings.max_new_tokens,
                    temperature=0,
                    repeat_penalty=settings.repetition_penalty,
                    stream=True,
                ):
                    delta = part["choices"][0]["delta"].get("content")
                    if delta:
                        first = first or time.perf_counter() - begin
                        pieces.append(delta)
                        run.tokens += 1  # one streamed piece per token
                history.append({"role": "assistant", "content": "".join(pieces)})
                run.latencies_s.append(time.perf_counter() - begin)
                run.ttft_s.append(first or 0.0)
                run.messages += 1
    run.wall_s = time.perf_counter() - started
    return run


def startup_seconds(cache_dir: Path) -> float:
    """Wall time of `python -m bot console` on empty input: start, load, ready, exit."""
    # The bot's model settings from the environment carry over, as in the bench itself.
    kept = ("HOME", "PATH", "LANG", "DTYPE", "DEVICE", "TORCH_THREADS", "CONTEXT_TOKENS")
    env = {k: v for k, v in os.environ.items() if k in kept}
    env.update(MODEL_CACHE_DIR=str(cache_dir), LOG_LEVEL="WARNING")
    begin = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bot", "console"],
        input="",
        env=env,
        capture_output=True,
        check=True,
        text=True,
        timeout=300,
    )
    return time.perf_counter() - begin


def on_own_thread(work: Callable[[], Any]) -> Any:
    """Run `work` (a bare `generate`) on a thread of its own, waiting for it: the
    calling thread stays blocked, as the seed's loop is. A thread that goes on living
    after torch work of its own (the event loop's) keeps its OpenMP team, and that was
    measured to slow the engine's worker thread ~2x (18 -> 10 tokens/s) for the rest
    of the process; the bot itself runs the model on its worker thread only."""
    out: list[Any] = []
    failed: list[BaseException] = []

    import torch  # imported late, as elsewhere in this module

    def run() -> None:
        try:
            with torch.inference_mode():
                out.append(work())
        except BaseException as exc:  # re-raised on the calling thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="bare-generate")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return out[0]
