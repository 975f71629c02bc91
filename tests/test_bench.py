"""`python -m bench`'s own code on the scripted model: its workloads run and end, its
ratios are computed against the issue's targets, and without matplotlib it still
writes its JSON and prints the ratios. No timing is asserted."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import PLANS, parse_args, paste_message, write
from bench.report import TARGETS, cpu_info, ratios, worst_turn
from bench.workloads import (
    Run,
    Setup,
    arrival_times,
    closed_loop,
    head_of_line,
    llama_cpp_run,
    long_history,
    open_loop,
    turn_by_turn,
)
from bot.inference.local import LocalBackend
from bot.settings import Settings
from bot.store.memory import InProcessMemory, Memory
from tests.scripted import ScriptedModel


def scripted_setup(model: Callable[[], ScriptedModel] | None = None) -> Setup:
    settings = Settings(_env_file=None, temperature=0, max_new_tokens=8)  # type: ignore[call-arg]

    def memory(max_turns: int) -> Memory:
        return InProcessMemory(max_turns, 60)

    make = model or (lambda: ScriptedModel("A short scripted reply.", chunk=4))
    return Setup(
        lambda: LocalBackend(make()),
        settings,
        memory,
        lambda text: len(text.split()),
        "scripted",
        1,
    )


async def test_workloads_and_report_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = scripted_setup()
    chats = [[f"Hello {n}", f"And then {n}?"] for n in range(4)]
    seed = Run("seed loop float32", 4, dtype="float32", threads=1, messages=8, tokens=80)
    seed.wall_s, seed.latencies_s, seed.ttft_s = 4.0, [1.0, 2.0], [1.0, 2.0]
    runs = [seed]
    for level in (1, 4):
        runs.append(await closed_loop(setup, chats[:level], 30, "this bot"))
    assert runs[-1].messages == 8 and not runs[-1].cut_short
    rates = [
        {"multiple": m, **await open_loop(setup, ["Hi"], m * 40, 4, 0.2, 10, seed=3)}
        for m in (0.5, 3)
    ]
    assert all(r["finished"] + r["unfinished"] + r["refused"] == r["arrivals"] for r in rates)
    assert all(r["no_first_token"] == 0 and r["ttft_max_s"] >= r["ttft_p95_s"] for r in rates)
    bot_rates = [
        {"multiple": m, **await open_loop(setup, ["Hi"], m * 40, 4, 0.2, 10, seed=3)}
        for m in (0.5, 0.75, 0.9)
    ]
    results: dict[str, Any] = {
        "machine": {**cpu_info(), "torch": "x", "torch_threads": 1, "dtype": "scripted"},
        "runs": [r.summary() for r in runs],
        "open_loop": {
            "seed": 3,
            "seed_capacity_msg_per_s": 2.0,
            "seed_system": "s",
            "rates": rates,
        },
        "open_loop_bot": {
            "seed": 3,
            "capacity_msg_per_s": 40.0,
            "capacity_from": "c",
            "rates": bot_rates,
        },
        "long_history": await long_history(setup, "pasted " * 300, ["What?", "Why?"], 30),
        "head_of_line": await head_of_line(setup, "long " * 500, "Short?", 0.01, 1, 30),
        "turns": await turn_by_turn(setup, [f"turn {n}" for n in range(30)], 1, 60, typing_s=0),
        "single": {"engine_s": 1.0, "bare_s": 1.0, "dtype": "scripted", "threads": 1},
        "llama_cpp": "not installed",
    }
    assert sorted(results["turns"]["at"]) == ["1", "10", "20", "30", "5"]
    assert len(results["turns"]["ttft_by_turn_s"]) == 30 and results["turns"]["typing_s"] == 0

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    printed: list[str] = []
    path, missing = write(results, tmp_path, "test", printed.append)

    assert missing is not None and "pip install -e '.[bench]'" in missing
    assert not (tmp_path / "test.png").exists()
    saved = json.loads(path.read_text())
    assert [r["key"] for r in saved["ratios"]] == [t[0] for t in TARGETS]
    by_key = {r["key"]: r for r in saved["ratios"]}
    measured = (
        "tokens_per_s_16_vs_seed",
        "ttft_turn_20_vs_turn_1",
        "ttft_worst_turn_vs_turn_1",
        "head_of_line_vs_alone",
        "ttft_after_paste_vs_fresh",
        "open_loop_3x_ttft_p95_s",
        "open_loop_3x_no_first_token",
        "open_loop_bot_075x_ttft_p95_s",
        "open_loop_bot_075x_no_first_token",
        "loop_lag_p99_ms",
    )
    for key in measured:
        assert isinstance(by_key[key]["met"], bool), by_key[key]
    assert by_key["open_loop_bot_075x_no_first_token"]["value"] == 0
    for key in ("tokens_per_s_16_vs_llama_cpp", "tokens_per_s_1_vs_llama_cpp"):
        assert by_key[key]["met"] is None and by_key[key]["detail"] == "not installed"
    assert by_key["startup_warm_cache_s"]["met"] is None  # not run here
    text = "\n".join(printed)
    assert "AVX512-BF16" in text and "capability" in text
    assert "Targets" in text and "not measured" in text
    assert "the bot's capacity" in text and "worst: turn" in text
    assert "pip install -e '.[bench]'" in text


def test_ratios_compare_with_the_faster_seed() -> None:
    def run(system: str, concurrency: int, dtype: str, tps: float) -> dict[str, Any]:
        return {"system": system, "concurrency": concurrency, "dtype": dtype, "threads": 2,
                "tokens_per_s": tps, "latency_p95_s": 1.0, "loop_lag_p99_ms": 3.0}  # fmt: skip

    results: dict[str, Any] = {
        "runs": [
            run("seed loop bfloat16", 16, "bfloat16", 10.0),
            run("seed loop float32", 16, "float32", 20.0),
            run("this bot", 16, "bfloat16", 160.0),
            run("llama-cpp-python", 1, "Q4_1 gguf", 200.0),
        ],
        "turns": {"at": {"1": 0.2, "5": 0.2, "10": 0.3, "20": 0.4}, "dtype": "b", "threads": 2},
        "open_loop": {"rates": [
            {"multiple": 1, "ttft_p95_s": 9.0, "rate_per_s": 1, "arrivals": 3, "unfinished": 0},
            {"multiple": 3, "ttft_p95_s": 1.5, "rate_per_s": 3, "arrivals": 9, "unfinished": 0,
             "loop_lag_p99_ms": 12.0},
        ]},
        "startup": {"warm_start_s": 4.0, "runs": 3},
    }  # fmt: skip
    by_key = {r["key"]: r for r in ratios(results)}
    assert by_key["tokens_per_s_16_vs_seed"]["value"] == 8.0  # against fp32, the faster
    assert by_key["tokens_per_s_16_vs_seed"]["met"] is True
    assert by_key["tokens_per_s_16_vs_llama_cpp"]["met"] is False
    assert by_key["ttft_turn_20_vs_turn_1"]["value"] == 2.0
    assert by_key["ttft_turn_20_vs_turn_1"]["met"] is False
    assert by_key["open_loop_3x_ttft_p95_s"]["value"] == 1.5  # the highest rate
    assert by_key["loop_lag_p99_ms"]["value"] == 12.0  # the worst workload
    assert by_key["startup_warm_cache_s"]["met"] is True
    assert by_key["head_of_line_vs_alone"]["met"] is None


def test_worst_turn_and_the_new_targets_from_known_figures() -> None:
    def run(system: str, concurrency: int, tps: float) -> dict[str, Any]:
        return {"system": system, "concurrency": concurrency, "dtype": "f", "threads": 2,
                "tokens_per_s": tps, "latency_p95_s": 1.0}  # fmt: skip

    def rate(multiple: float, p95: float, late: int) -> dict[str, Any]:
        return {"multiple": multiple, "ttft_p95_s": p95, "no_first_token": late, "refused": 0,
                "rate_per_s": multiple, "arrivals": 9, "unfinished": late}  # fmt: skip

    assert worst_turn([0.2, 0.25, 0.5, 0.3]) == (3, 2.5)
    assert worst_turn([0.4]) == (0, None)
    results: dict[str, Any] = {
        "runs": [run("this bot", 1, 10.0), run("this bot", 16, 100.0),
                 run("llama-cpp-python", 1, 25.0)],
        "turns": {"ttft_by_turn_s": [0.2, 0.25, 0.5, 0.3], "at": {"1": 0.2}, "typing_s": 3.0},
        "open_loop": {"rates": [rate(1, 0.5, 0), rate(3, 1.0, 2)]},
        "open_loop_bot": {"rates": [rate(0.5, 0.3, 0), rate(0.75, 2.5, 0), rate(0.9, 9.0, 4)]},
    }  # fmt: skip
    by_key = {r["key"]: r for r in ratios(results)}
    assert (
        by_key["ttft_worst_turn_vs_turn_1"]["value"],
        by_key["ttft_worst_turn_vs_turn_1"]["met"],
    ) == (2.5, False)
    assert "turn 3" in by_key["ttft_worst_turn_vs_turn_1"]["detail"]
    assert by_key["tokens_per_s_1_vs_llama_cpp"]["value"] == 0.4  # 10 / 25: missed
    assert by_key["tokens_per_s_1_vs_llama_cpp"]["met"] is False
    assert by_key["tokens_per_s_16_vs_llama_cpp"]["value"] == 4.0
    assert by_key["tokens_per_s_16_vs_llama_cpp"]["met"] is True
    assert (
        by_key["open_loop_3x_ttft_p95_s"]["met"],
        by_key["open_loop_3x_no_first_token"]["met"],
    ) == (True, False)
    assert by_key["open_loop_3x_no_first_token"]["value"] == 2
    # The 0.75x rate, not the highest: p95 missed, every message had its first token.
    assert by_key["open_loop_bot_075x_ttft_p95_s"]["value"] == 2.5
    assert by_key["open_loop_bot_075x_ttft_p95_s"]["met"] is False
    assert by_key["open_loop_bot_075x_no_first_token"]["met"] is True
    results["turns"]["ttft_by_turn_s"] = [0.2, 0.3, 0.1]
    assert {r["key"]: r for r in ratios(results)}["ttft_worst_turn_vs_turn_1"]["met"] is True


async def test_open_loop_counts_messages_without_a_first_token() -> None:
    """A scripted model so slow that while it writes one reply (40 chunks, 0.5 s each)
    the others wait: cut at the drain, they count as having no first token."""

    def slow() -> ScriptedModel:
        return ScriptedModel(lambda text: "ok" if text == "Hi!" else "x" * 40, chunk=1, delay=0.5)

    out = await open_loop(scripted_setup(slow), ["Hello"], 1000, 4, 0.2, 1.0, seed=3)
    assert out["arrivals"] == 4 and out["unfinished"] == 4 and out["finished"] == 0
    assert out["cut_waiting"] == 3 and out["no_first_token"] == 3  # all but the one begun
    fast = await open_loop(scripted_setup(), ["Hello"], 1000, 4, 0.2, 10, seed=3, late_s=0.0)
    assert fast["finished"] == 4 and fast["no_first_token"] == 4  # none within 0 s


def test_llama_cpp_is_skipped_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails

    def gguf() -> Path:
        raise AssertionError("looked up the GGUF file without llama_cpp")

    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert llama_cpp_run(gguf, [["Hi"]], settings, 1.0) is None


def test_arrivals_are_seeded_and_bounded() -> None:
    slow = arrival_times(50, 1.0, 10.0, seed=5)
    fast = arrival_times(50, 3.0, 10.0, seed=5)
    assert slow == arrival_times(50, 1.0, 10.0, seed=5)
    assert 2 <= len(slow) <= 50 and slow[-1] <= 10.0
    assert fast[: len(slow)] == pytest.approx([t / 3 for t in slow][: len(fast)])
    assert len(arrival_times(50, 0.001, 10.0, seed=5)) == 2  # too slow: two, in the window
    assert len(arrival_times(4, 1000.0, 10.0, seed=5)) == 4


def test_plans_and_paste() -> None:
    assert PLANS["full"].paste_chars == PLANS["quick"].paste_chars == 12_000
    full = PLANS["full"]
    assert full.turn_count == 30 and full.typing_s == 3.0 and 3 in full.open_multiples
    assert full.open_bot_multiples == (0.5, 0.75, 0.9)
    data = json.loads((Path(__file__).parent.parent / "bench" / "conversations.json").read_text())
    assert len(data["long"]["turns"]) >= full.turn_count
    assert len(paste_message(data, 12_000)) == 12_000
    assert parse_args(["--quick", "--only", "turns,head-of-line"]).only == ["turns", "head-of-line"]
    assert parse_args(["--only", "open-loop-bot"]).only == ["open-loop-bot"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "nonsense"])


async def test_a_failed_reply_stops_a_workload_rather_than_pass_for_a_fast_one() -> None:
    setup = scripted_setup()
    setup.make_backend = lambda: LocalBackend(ScriptedModel(fail_on="boom"))
    with pytest.raises(RuntimeError, match="did not answer"):
        await turn_by_turn(setup, ["hello", "boom"], 1, 30)


def test_readme_performance_names_the_cpu_of_the_latest_run() -> None:
    """The README's "latest full run" says which CPU its figures came from: the one
    recorded with the committed full run (earlier runs, on other CPUs, are described
    apart)."""
    repo = Path(__file__).resolve().parent.parent
    machine = json.loads((repo / "bench" / "results" / "latest.json").read_text())["machine"]
    readme = (repo / "README.md").read_text()
    section = readme[readme.index("## Performance") :]
    section = section[: section.index("\n## ", 1)]
    latest = section[section.index("The latest full run") :]
    latest = latest[: latest.index("\n\n")]
    cpu = re.sub(r"\((R|TM)\)|\bProcessor\b|CPU", "", machine["cpu_model"]).split()
    assert " ".join(cpu) in latest, cpu
    assert machine["cpu_capability"] in latest
    assert ("AVX512-BF16" in latest) == bool(machine["avx512_bf16"])
    assert ("no AMX" in latest) == (not machine["amx"])
    assert {"float32": "fp32", "bfloat16": "bf16"}[machine["dtype"]] in latest
