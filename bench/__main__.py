"""`python -m bench [--quick]`: this bot's engine against the seed's chatbot loop (and
llama-cpp-python when it is installed), in one run, on the same model and chats.

Writes bench/results/latest.json and bench/results/latest.png, and prints the ratios.
Run it with nothing else on the cores: every figure is a ratio within this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot.engine import Backend, Engine
from bot.generation import Generator
from bot.memory import RedisMemory
from bot.messages import ConversationKey, Message
from bot.model import LoadedModel, bundled_gguf, load_model
from bot.settings import Settings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
log = logging.getLogger("bench")


@dataclass
class Run:
    """One system at one concurrency: what the chart and the ratios use."""

    system: str
    concurrency: int
    messages: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    loop_lag_p99_ms: float | None = None
    peak_rss_mb: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "messages": self.messages,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else 0,
            "latency_p50_s": round(percentile(self.latencies_s, 50), 2),
            "latency_p95_s": round(percentile(self.latencies_s, 95), 2),
            "ttft_p50_s": round(percentile(self.ttft_s, 50), 3),
            "loop_lag_p99_ms": self.loop_lag_p99_ms,
            "peak_rss_mb": round(self.peak_rss_mb),
        }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))
    return ordered[index]


# --- measuring --------------------------------------------------------------------------


@contextmanager
def peak_rss(run: Run) -> Iterator[None]:
    """Peak resident memory during the block (Linux: reset the high-water mark first)."""
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    yield
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
        return round(percentile(self.lags, 99) * 1000, 2)


class RedisServer:
    """A throwaway redis-server on a free loopback port."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server is needed (make test installs it)")
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

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the systems ------------------------------------------------------------------------------


def seed_loop(generator: Generator, chats: list[list[str]]) -> Run:
    """The seed's chatbot loop: one `model.generate` per message, one message after
    another, history kept in a list, no streaming, no batching.

    It serves `len(chats)` people at once as such a loop would: each person's next
    message arrives when their previous reply is done, and messages wait their turn
    in arrival order; a reply's latency counts that wait.
    """
    loaded = generator.loaded
    tokenizer, model = loaded.tokenizer, loaded.model
    run = Run("seed loop", len(chats))
    kwargs = generator.options.generate_kwargs()
    system = {"role": "system", "content": generator.format.system_prompt}
    histories: list[list[dict[str, str]]] = [[system] for _ in chats]
    waiting = deque((0.0, number, 0) for number in range(len(chats)))
    generation_times = []
    started = time.perf_counter()
    with peak_rss(run):
        while waiting:
            arrived, number, turn = waiting.popleft()
            history = histories[number]
            history.append({"role": "user", "content": chats[number][turn]})
            begin = time.perf_counter()
            inputs = tokenizer.apply_chat_template(
                history, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.inference_mode():
                output = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, **kwargs)
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


async def engine_run(
    generator: Generator,
    redis_url: str,
    chats: list[list[str]],
    settings: Settings,
    server: Settings | None = None,
) -> Run:
    """This bot's engine with Redis memory, `len(chats)` conversations at once, each
    sending its next message when the previous reply is complete, as an adapter would.
    With `server`: MODEL_BACKEND=openai, replies from that inference server."""
    memory = RedisMemory(redis_url, settings.memory_max_turns, settings.memory_ttl_seconds)
    model: Backend | Generator = generator
    if server is not None:
        from bot.openai_backend import OpenAIBackend

        model = OpenAIBackend(server)
    engine = Engine.from_settings(model, memory, settings)
    tokenizer = generator.loaded.tokenizer  # the same model: count tokens alike
    run = Run("this bot, openai backend" if server else "this bot", len(chats))
    probe = LagProbe()

    async def converse(number: int, turns: list[str]) -> None:
        key = ConversationKey("bench", f"{len(chats)}-{number}-{time.monotonic_ns()}")
        for text in turns:
            begin = time.perf_counter()
            first: float | None = None
            stream = engine.stream(Message(key, "bench", "bench", text))
            async for _chunk in stream:
                first = first or time.perf_counter() - begin
            run.latencies_s.append(time.perf_counter() - begin)
            run.ttft_s.append(first or 0.0)
            assert stream.reply is not None and stream.reply.ok, stream.reply
            run.tokens += len(tokenizer.encode(stream.reply.text, add_special_tokens=False))
            run.messages += 1

    with peak_rss(run):
        probe.start()
        started = time.perf_counter()
        await asyncio.gather(*(converse(n, turns) for n, turns in enumerate(chats)))
        run.wall_s = time.perf_counter() - started
        run.loop_lag_p99_ms = await probe.stop()
    await engine.close()
    return run


async def long_conversation(
    generator: Generator, redis_url: str, turns: list[str], settings: Settings
) -> list[float]:
    """Time to first token at each turn of one long conversation."""
    memory = RedisMemory(redis_url, 2 * len(turns), settings.memory_ttl_seconds)
    engine = Engine(generator, memory)
    key = ConversationKey("bench", f"long-{time.monotonic_ns()}")
    firsts = []
    for text in turns:
        begin = time.perf_counter()
        first = None
        async for _chunk in engine.stream(Message(key, "bench", "bench", text)):
            first = first or time.perf_counter() - begin
        firsts.append(first or 0.0)
    await engine.close()
    return firsts


def llama_cpp_run(chats: list[list[str]], settings: Settings, max_new_tokens: int) -> Run | None:
    """The peer: llama-cpp-python on the same GGUF file, one message after another."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm: Any = Llama(
        model_path=str(bundled_gguf()), n_ctx=4096, n_threads=os.cpu_count(), verbose=False
    )
    run = Run("llama-cpp-python", 1)
    started = time.perf_counter()
    with peak_rss(run):
        for turns in chats:
            history = [{"role": "system", "content": settings.system_prompt}]
            for text in turns:
                history.append({"role": "user", "content": text})
                begin = time.perf_counter()
                first = None
                pieces = []
                for part in llm.create_chat_completion(
                    messages=history,
                    max_tokens=max_new_tokens,
                    temperature=0,
                    repeat_penalty=settings.repetition_penalty,
                    stream=True,
                ):
                    delta = part["choices"][0]["delta"].get("content")
                    if delta:
                        first = first or time.perf_counter() - begin
                        pieces.append(delta)
                        run.tokens += 1  # one streamed piece per token
                reply = "".join(pieces)
                history.append({"role": "assistant", "content": reply})
                run.latencies_s.append(time.perf_counter() - begin)
                run.ttft_s.append(first or 0.0)
                run.messages += 1
    run.wall_s = time.perf_counter() - started
    return run


def startup_seconds(cache_dir: Path) -> float:
    """Wall time of `python -m bot console` on empty input: start, load, ready, exit."""
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "LANG")}
    env.update(MODEL_CACHE_DIR=str(cache_dir), LOG_LEVEL="WARNING")
    begin = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bot", "console"],
        input="",
        env=env,
        capture_output=True,
        check=True,
        text=True,
    )
    return time.perf_counter() - begin


async def single_vs_bare(generator: Generator, text: str, repeats: int) -> tuple[float, float]:
    """Median wall time of one message through the engine and of a bare
    `model.generate` of the same prompt, measured alternately so that drift in the
    machine's speed touches both alike."""
    from bot.memory import InProcessMemory

    engine = Engine(generator, InProcessMemory(4, 60))
    prompt = generator.prepare([], text)
    ids = torch.tensor([prompt.input_ids])
    kwargs = generator.options.generate_kwargs()
    bare, through_engine = [], []
    for n in range(repeats):
        begin = time.perf_counter()
        with torch.inference_mode():
            generator.loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=generator.loaded.tokenizer.pad_token_id,
                **kwargs,
            )
        bare.append(time.perf_counter() - begin)
        begin = time.perf_counter()
        await engine.reply(Message(ConversationKey("bench", f"single-{n}"), "b", "b", text))
        through_engine.append(time.perf_counter() - begin)
    await engine.close()
    return statistics.median(through_engine), statistics.median(bare)


# --- reporting ----------------------------------------------------------------------------


def chart(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in dict.fromkeys(r["system"] for r in runs):
        rows = sorted((r for r in runs if r["system"] == system), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        style = "o-" if len(rows) > 1 else "s"
        left.plot(xs, [r["tokens_per_s"] for r in rows], style, label=system)
        right.plot(xs, [r["latency_p95_s"] for r in rows], style, label=system)
    for axis, title in ((left, "aggregate tokens/s"), (right, "p95 reply latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent conversations")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"SmolLM2-135M, {os.cpu_count()} CPU cores: python -m bench")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 2 minutes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument(
        "--openai-url",
        help="also run the engine with MODEL_BACKEND=openai against this server "
        "(e.g. http://127.0.0.1:8000/v1, serving the same model)",
    )
    parser.add_argument("--openai-model", default="", help="the model name the server serves")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("bot").setLevel(logging.WARNING)

    data = json.loads((HERE / "conversations.json").read_text())
    chats = [c["turns"] for c in data["conversations"]]
    max_new = 24 if args.quick else 64
    turns = 2
    levels = [1, 4, 16] if args.quick else [1, 4, 16, 32]
    long_turns = data["long"]["turns"][: 6 if args.quick else 20]

    settings = Settings(_env_file=None, temperature=0, max_new_tokens=max_new)  # type: ignore[call-arg]
    begin = time.perf_counter()
    loaded: LoadedModel = load_model(settings)
    log.info("model loaded in %.1f s", time.perf_counter() - begin)
    generator = Generator.from_settings(loaded, settings)
    generator.generate(generator.prepare([], "Warm up."))

    results: dict[str, Any] = {
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "dtype": str(next(loaded.model.parameters()).dtype),
        },
        "settings": {"max_new_tokens": max_new, "turns_per_chat": turns, "greedy": True},
    }
    runs: list[Run] = []
    for level in (1, 16):
        log.info("seed loop: %d people at once, %d turns each", level, turns)
        runs.append(seed_loop(generator, [c[:turns] for c in chats[:level]]))
    redis = RedisServer()
    try:
        for level in levels:
            log.info("this bot: %d concurrent conversations", level)
            runs.append(
                asyncio.run(
                    engine_run(generator, redis.url, [c[:turns] for c in chats[:level]], settings)
                )
            )
        if args.openai_url:
            server = settings.model_copy(
                update={
                    "model_backend": "openai",
                    "openai_base_url": args.openai_url,
                    "openai_model": args.openai_model,
                }
            )
            for level in levels:
                log.info("this bot, openai backend: %d concurrent conversations", level)
                chosen = [c[:turns] for c in chats[:level]]
                runs.append(asyncio.run(engine_run(generator, redis.url, chosen, settings, server)))
        log.info("long conversation: %d turns", len(long_turns))
        firsts = asyncio.run(long_conversation(generator, redis.url, long_turns, settings))
    finally:
        redis.stop()
    log.info("llama-cpp-python, if installed")
    peer = llama_cpp_run([c[:turns] for c in chats[:16]], settings, max_new)
    if peer is not None:
        runs.append(peer)
    log.info("one message: engine and bare generate, alternately")
    single, bare = asyncio.run(single_vs_bare(generator, chats[0][0], 3 if args.quick else 7))
    startup = statistics.median(startup_seconds(settings.model_cache_dir) for _ in range(3))

    summaries = [r.summary() for r in runs]
    by = {(s["system"], s["concurrency"]): s for s in summaries}
    top = max(levels[-1], 16) if 16 in levels else levels[-1]
    bot16, seed16 = by[("this bot", 16)], by[("seed loop", 16)]
    ratios = {
        "tokens_per_s_16_vs_seed": round(bot16["tokens_per_s"] / seed16["tokens_per_s"], 2),
        "p95_latency_16_vs_seed": round(bot16["latency_p95_s"] / seed16["latency_p95_s"], 2),
        "single_reply_vs_bare_generate": round(single / bare, 3),
        "single_reply_s": round(single, 2),
        "bare_generate_s": round(bare, 2),
        "loop_lag_p99_ms_at_full_load": by[("this bot", top)]["loop_lag_p99_ms"],
        "startup_warm_cache_s": round(startup, 2),
        "ttft_turn_1_s": round(firsts[0], 3),
        f"ttft_turn_{len(firsts)}_s": round(firsts[-1], 3),
    }
    if peer is not None:
        ratios["tokens_per_s_16_vs_llama_cpp"] = round(
            bot16["tokens_per_s"] / by[("llama-cpp-python", 1)]["tokens_per_s"], 2
        )
    else:
        results["llama_cpp"] = "skipped: llama_cpp is not importable (pip install llama-cpp-python)"
    results.update(runs=summaries, ratios=ratios, ttft_by_turn_s=[round(f, 3) for f in firsts])
    results["raw"] = [asdict(r) for r in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else "latest"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    chart(summaries, args.out / f"{name}.png")

    header = ("system", "conc", "tok/s", "p50 s", "p95 s", "ttft s", "lag99 ms", "RSS MB")
    print("\n{:<18}{:>5}{:>8}{:>8}{:>8}{:>8}{:>10}{:>8}".format(*header))
    for s in summaries:
        lag = "-" if s["loop_lag_p99_ms"] is None else f"{s['loop_lag_p99_ms']:.1f}"
        print(
            f"{s['system']:<18}{s['concurrency']:>5}{s['tokens_per_s']:>8.1f}{s['latency_p50_s']:>8.2f}"
            f"{s['latency_p95_s']:>8.2f}{s['ttft_p50_s']:>8.3f}{lag:>10}{s['peak_rss_mb']:>8.0f}"
        )
    print()
    for key, value in ratios.items():
        print(f"{key:<34}{value}")
    if peer is None:
        print("llama-cpp-python: skipped (not installed; it compiles for ~7 minutes)")
    print(f"\nwrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")


if __name__ == "__main__":
    main()
