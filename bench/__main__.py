"""`python -m bench [--quick]`: this bot's engine against the seed's chatbot loop (and
llama-cpp-python when it is installed), in one run, on the same model and chats.

Workloads: the seed loop (in its default fp32 and in the bot's dtype); the engine in a
closed loop at 1-32 conversations; open-loop Poisson arrivals at 0.5x, 1x and 3x the
seed loop's capacity and at 0.5x, 0.75x and 0.9x the bot's own (its closed loop at 16
conversations); a 12,000-character paste then short questions; a one-line question
behind another conversation's long message; first token at turns 1-30, 3 s of typing
between turns; one message against a bare `generate`; llama-cpp-python's one stream
when it is installed; warm start.

Writes bench/results/latest.json (quick.json with --quick) and a chart when
matplotlib is installed, and prints every figure with the CPU, dtype and threads and
each of the issue's targets, met or missed. Run it with nothing else on the cores:
every figure is a ratio within this run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.workloads import (
    RedisServer,
    Run,
    Setup,
    closed_loop,
    dtype_name,
    head_of_line,
    llama_cpp_run,
    long_history,
    new_key,
    open_loop,
    seed_loop,
    single_vs_bare,
    startup_seconds,
    timed,
    turn_by_turn,
)
from bot.inference.generation import Generator
from bot.inference.loader import bundled_gguf, load_model
from bot.inference.local import LocalBackend
from bot.settings import Settings
from bot.store.memory import InProcessMemory, Memory, RedisMemory

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
log = logging.getLogger("bench")

WORKLOADS = (
    "seed", "closed", "open-loop", "open-loop-bot", "long-history", "head-of-line", "turns",
    "llama-cpp", "single", "startup",
)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """How much each workload does, and its time budget in seconds."""

    max_new: int  # reply tokens: throughput workloads
    ttft_new: int  # reply tokens: first-token workloads (the history still grows)
    turns_per_chat: int
    levels: tuple[int, ...]  # closed-loop concurrencies
    closed_budget_s: float
    seed_people: int
    seed_budget_s: float
    open_multiples: tuple[float, ...]  # of the seed loop's capacity
    open_bot_multiples: tuple[float, ...]  # of the bot's (closed loop, 16 conversations)
    open_max: int
    open_window_s: float
    open_drain_s: float
    paste_chars: int
    paste_questions: int
    paste_budget_s: float
    hol_reps: int
    hol_budget_s: float
    turn_count: int
    turn_reps: int
    turn_budget_s: float
    typing_s: float  # between a reply's end and the next message, in the turns workload
    single_reps: int
    single_budget_s: float
    startup_reps: int
    llama_budget_s: float


PLANS = {
    # ~12 minutes alone on 2 cores (AVX-512).
    "full": Plan(
        max_new=64, ttft_new=32, turns_per_chat=2, levels=(1, 4, 16, 32), closed_budget_s=90,
        seed_people=16, seed_budget_s=75, open_multiples=(0.5, 1, 3),
        open_bot_multiples=(0.5, 0.75, 0.9), open_max=24, open_window_s=40, open_drain_s=30,
        paste_chars=12_000, paste_questions=4, paste_budget_s=90, hol_reps=3, hol_budget_s=90,
        turn_count=30, turn_reps=1, turn_budget_s=200, typing_s=3.0, single_reps=7,
        single_budget_s=60, startup_reps=3, llama_budget_s=60,
    ),
    # ~4 minutes.
    "quick": Plan(
        max_new=24, ttft_new=16, turns_per_chat=2, levels=(1, 4, 16), closed_budget_s=45,
        seed_people=16, seed_budget_s=12, open_multiples=(0.5, 1, 3),
        open_bot_multiples=(0.5, 0.75, 0.9), open_max=12, open_window_s=8, open_drain_s=10,
        paste_chars=12_000, paste_questions=2, paste_budget_s=30, hol_reps=1, hol_budget_s=30,
        turn_count=10, turn_reps=1, turn_budget_s=60, typing_s=3.0, single_reps=3,
        single_budget_s=20, startup_reps=1, llama_budget_s=20,
    ),
    # A smoke test of the bench itself (--tiny, not in --help): the figures mean nothing.
    "tiny": Plan(
        max_new=8, ttft_new=8, turns_per_chat=1, levels=(1, 4), closed_budget_s=20,
        seed_people=4, seed_budget_s=6, open_multiples=(0.5, 3), open_bot_multiples=(0.75,),
        open_max=4, open_window_s=4, open_drain_s=10, paste_chars=2_000, paste_questions=1,
        paste_budget_s=20, hol_reps=1, hol_budget_s=20, turn_count=5, turn_reps=1,
        turn_budget_s=20, typing_s=0.5, single_reps=1, single_budget_s=10, startup_reps=0,
        llama_budget_s=10,
    ),
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, under ~3 minutes")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        type=lambda text: [w.strip() for w in text.split(",") if w.strip()],
        default=None,
        metavar="W1,W2",
        help=f"run only these workloads, of: {', '.join(WORKLOADS)} (open-loop runs the "
        "seed loop too: its rates are multiples of the seed's capacity; open-loop-bot a "
        "closed loop at 16 conversations, for the bot's); writes <name>-only.json",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the open-loop arrivals")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument(
        "--openai-url",
        help="also run the engine with MODEL_BACKEND=openai against this server "
        "(e.g. http://127.0.0.1:8000/v1, serving the same model)",
    )
    parser.add_argument("--openai-model", default="", help="the model name the server serves")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    return args


def paste_message(data: dict[str, Any], chars: int) -> str:
    """The lead and the pasted text as one message of exactly `chars` characters."""
    paste = data["paste"]
    text = f"{paste['lead']}\n\n{paste['text']}"
    while len(text) < chars:  # a longer paste than the stored text: it repeats
        text += "\n\n" + paste["text"]
    return text[:chars]


def write(
    results: dict[str, Any], out: Path, name: str, print_line: Any = print
) -> tuple[Path, str | None]:
    """Write the JSON, then try the chart; print the report. Returns the JSON's path
    and, when the chart could not be drawn, why (with how to get it)."""
    results["ratios"] = report.ratios(results)
    results["extras"] = report.extras(results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    missing = report.chart(results, out / f"{name}.png")
    for line in report.lines(results):
        print_line(line)
    print_line("")
    print_line(missing or f"wrote {out / (name + '.png')}")
    print_line(f"wrote {path}")
    return path, missing


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    plan = PLANS[mode]
    chosen = set(args.only or WORKLOADS)
    if "open-loop" in chosen:
        chosen.add("seed")  # the open loop's rates are multiples of the seed's capacity
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("bot").setLevel(logging.WARNING)
    bench_started = time.perf_counter()

    data = json.loads((HERE / "conversations.json").read_text())
    chats: list[list[str]] = [c["turns"][: plan.turns_per_chat] for c in data["conversations"]]
    paste = paste_message(data, plan.paste_chars)
    questions: list[str] = data["paste"]["questions"][: plan.paste_questions]
    question: str = data["head_of_line"]["question"]

    settings = Settings(_env_file=None, temperature=0, max_new_tokens=plan.max_new)  # type: ignore[call-arg]
    begin = time.perf_counter()
    loaded = load_model(settings)
    log.info("model loaded in %.1f s", time.perf_counter() - begin)
    dtype, threads = dtype_name(loaded.model), torch.get_num_threads()
    if settings.dtype == "int8":  # the engine's products; the seed loop's stay bf16
        dtype = f"int8 weights, {dtype}"
    tokenizer = loaded.tokenizer

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    redis = RedisServer.start()
    if redis is None:
        log.warning("redis-server is not installed: the engine runs with in-process memory")

    def memory(max_turns: int) -> Memory:
        if redis is None:
            return InProcessMemory(max_turns, settings.memory_ttl_seconds)
        return RedisMemory(redis.url, max_turns, settings.memory_ttl_seconds)

    def setup_for(new_tokens: int) -> Setup:
        chosen = settings.model_copy(update={"max_new_tokens": new_tokens})
        return Setup(
            lambda: LocalBackend.from_settings(Generator.from_settings(loaded, chosen), chosen),
            chosen,
            memory,
            count_tokens,
            dtype,
            threads,
        )

    setup, ttft_setup = setup_for(plan.max_new), setup_for(plan.ttft_new)

    async def warm_up() -> None:
        engine = setup.engine()
        try:
            await timed(engine, new_key("warm"), "Warm up.")
        finally:
            await engine.close()

    machine = report.cpu_info()
    machine.update(
        python=platform.python_version(), torch=torch.__version__, torch_threads=threads,
        dtype=dtype, memory="redis" if redis else "in-process",
    )  # fmt: skip
    results: dict[str, Any] = {
        "mode": mode,
        "quick": mode != "full",
        "workloads": sorted(chosen),
        "machine": machine,
        "settings": {
            "max_new_tokens": plan.max_new,
            "ttft_max_new_tokens": plan.ttft_new,
            "turns_per_chat": plan.turns_per_chat,
            "greedy": True,
            "open_loop_seed": args.seed,
            "plan": asdict(plan),
        },
    }
    runs: list[Run] = []
    try:
        if "seed" in chosen:
            log.info("seed loop (%s): 1 person, %d turns", dtype, plan.turns_per_chat)
            label, budget = f"seed loop {dtype}", plan.seed_budget_s
            runs.append(seed_loop(loaded, settings, chats[:1], budget, label))
            people = chats[: plan.seed_people]
            log.info("seed loop (%s): %d people at once", dtype, len(people))
            runs.append(seed_loop(loaded, settings, people, budget, label))
            if dtype != "float32":
                # The seed loads its model without a dtype: torch's default, fp32.
                log.info("seed loop (float32, as the seed loads it): %d people", len(people))
                fp32 = load_model(settings.model_copy(update={"dtype": "fp32"}))
                runs.append(seed_loop(fp32, settings, people, budget, "seed loop float32"))
                del fp32
                gc.collect()
        # Only now is an engine built: it may adapt the model (its attention) for its
        # scheduler, and the seed loop runs on the model as transformers loads it.
        asyncio.run(warm_up())
        if "closed" in chosen:
            for level in plan.levels:
                log.info("this bot: %d concurrent conversations", level)
                runs.append(
                    asyncio.run(closed_loop(setup, chats[:level], plan.closed_budget_s, "this bot"))
                )
        if args.openai_url and "closed" in chosen:
            from bot.inference.served import OpenAIBackend

            server = settings.model_copy(
                update={
                    "model_backend": "openai",
                    "openai_base_url": args.openai_url,
                    "openai_model": args.openai_model,
                }
            )
            remote = Setup(
                lambda: OpenAIBackend(server), settings, memory, count_tokens, "server", 0
            )
            for level in plan.levels:
                log.info("this bot, openai backend: %d concurrent conversations", level)
                runs.append(
                    asyncio.run(
                        closed_loop(
                            remote, chats[:level], plan.closed_budget_s, "this bot, openai backend"
                        )
                    )
                )
        results["runs"] = [r.summary() for r in runs]
        texts = [c["turns"][0] for c in data["conversations"]]

        def open_rates(multiples: tuple[float, ...], capacity: float, whose: str) -> list[Any]:
            rates = []
            for multiple in multiples:
                log.info("open loop: %gx the %s %.3f msg/s", multiple, whose, capacity)
                measured = asyncio.run(
                    open_loop(setup, texts, multiple * capacity, plan.open_max,
                              plan.open_window_s, plan.open_drain_s, args.seed)
                )  # fmt: skip
                rates.append({"multiple": multiple, **measured})
            return rates

        if "open-loop" in chosen:
            seed = report.fastest_seed(results)
            assert seed is not None
            capacity = seed["messages_per_s"]
            results["open_loop"] = {
                "seed": args.seed,
                "seed_capacity_msg_per_s": capacity,
                "seed_system": f"{seed['system']}, {seed['concurrency']} people",
                "rates": open_rates(plan.open_multiples, capacity, "seed's"),
            }
        if "open-loop-bot" in chosen:
            bot = report.capacity_run(results)
            if bot is None:  # not in this run's closed loop: measured here, for its rate
                log.info("this bot: 16 concurrent conversations, for its capacity")
                people = chats[:16]
                runs.append(
                    asyncio.run(closed_loop(setup, people, plan.closed_budget_s, "this bot"))
                )
                results["runs"] = [r.summary() for r in runs]
                bot = report.capacity_run(results)
            assert bot is not None
            capacity = bot["messages_per_s"]
            results["open_loop_bot"] = {
                "seed": args.seed,
                "capacity_msg_per_s": capacity,
                "capacity_from": f"closed loop at {bot['concurrency']} conversations: "
                f"{bot['messages']} messages in {bot['wall_s']} s",
                "rates": open_rates(plan.open_bot_multiples, capacity, "bot's") if capacity else [],
            }
        if "long-history" in chosen:
            log.info("long history: a %d-character paste, then short questions", len(paste))
            results["long_history"] = asyncio.run(
                long_history(ttft_setup, paste, questions, plan.paste_budget_s)
            )
        if "head-of-line" in chosen:
            log.info("head of line: a question 0.5 s after a %d-character message", len(paste))
            results["head_of_line"] = asyncio.run(
                head_of_line(ttft_setup, paste, question, 0.5, plan.hol_reps, plan.hol_budget_s)
            )
        if "turns" in chosen:
            turns = data["long"]["turns"][: plan.turn_count]
            log.info("first token by turn: %d turns, %g s typing", len(turns), plan.typing_s)
            results["turns"] = asyncio.run(
                turn_by_turn(ttft_setup, turns, plan.turn_reps, plan.turn_budget_s, plan.typing_s)
            )
        if "single" in chosen:
            log.info("one message: engine and bare generate, alternately")
            single, bare = asyncio.run(
                single_vs_bare(setup, loaded, chats[0][0], plan.single_reps, plan.single_budget_s)
            )
            results["single"] = {
                "engine_s": round(single, 3), "bare_s": round(bare, 3), **setup.tags()
            }  # fmt: skip
    finally:
        if redis is not None:
            redis.stop()
    if "llama-cpp" in chosen:
        log.info("llama-cpp-python, if installed")
        peer = llama_cpp_run(bundled_gguf, chats[:16], settings, plan.llama_budget_s)
        if peer is None:
            results["llama_cpp"] = (
                "not installed (pip install llama-cpp-python; it compiles for ~7-12 minutes)"
            )
        else:
            runs.append(peer)
    if "startup" in chosen and plan.startup_reps:
        log.info("warm start: python -m bot console, %d times", plan.startup_reps)
        times = [startup_seconds(settings.model_cache_dir) for _ in range(plan.startup_reps)]
        results["startup"] = {
            "warm_start_s": round(statistics.median(times), 2),
            "runs": len(times),
        }
    results["runs"] = [r.summary() for r in runs]
    results["raw"] = [asdict(r) for r in runs]
    results["bench_wall_s"] = round(time.perf_counter() - bench_started, 1)
    name = {"full": "latest", "quick": "quick", "tiny": "tiny"}[mode]
    if args.only:
        name += "-only"
    write(results, args.out, name)
    print(f"bench ran for {results['bench_wall_s']:.0f} s")


if __name__ == "__main__":
    main()
