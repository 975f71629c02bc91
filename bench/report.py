"""The bench's report: the machine, the ratios against the issue's targets, the printed
table and the chart. Pure functions of the results dict (what latest.json holds), so
that a test can check them without running a model.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

CHART_HINT = "pip install -e '.[bench]' (or make bench) for the chart"

# The targets: (key, what, comparison, target, unit).
TARGETS: list[tuple[str, str, str, float, str]] = [
    ("tokens_per_s_16_vs_seed", "16 concurrent vs seed loop, tokens/s", ">=", 8.0, "x"),
    ("tokens_per_s_16_vs_llama_cpp", "16 concurrent vs llama-cpp one stream", ">=", 1.5, "x"),
    ("tokens_per_s_1_vs_llama_cpp", "1 conversation vs llama-cpp one stream", ">=", 0.5, "x"),
    ("ttft_turn_20_vs_turn_1", "first token, turn 20 / turn 1", "<=", 1.5, "x"),
    ("ttft_worst_turn_vs_turn_1", "first token, worst of turns 1-30 / turn 1", "<=", 1.5, "x"),
    ("ttft_after_paste_vs_fresh", "first token after 12,000-char paste / fresh", "<=", 2.0, "x"),
    ("head_of_line_vs_alone", "head of line: first token behind long / alone", "<=", 2.0, "x"),
    ("open_loop_3x_ttft_p95_s", "open loop at 3x seed capacity, p95 first token", "<=", 2.0, "s"),
    ("open_loop_3x_no_first_token", "open loop at 3x seed: no first token in 10 s", "<=", 0, "msg"),
    ("open_loop_bot_075x_ttft_p95_s", "open loop at 0.75x bot capacity, p95 1st token", "<=", 2,
     "s"),
    ("open_loop_bot_075x_no_first_token", "open loop at 0.75x bot: no first token in 10 s", "<=",
     0, "msg"),
    ("single_reply_vs_bare_generate", "1 conversation / bare generate", "<=", 1.05, "x"),
    ("loop_lag_p99_ms", "event-loop lag p99 (worst engine workload)", "<=", 10.0, "ms"),
    ("startup_warm_cache_s", "warm start to ready", "<=", 5.0, "s"),
]  # fmt: skip
# Open-loop targets: (key prefix, the results' key, the rate's multiple, of whose capacity).
OPEN_TARGETS = (("open_loop_3x", "open_loop", 3.0, "seed"),
                ("open_loop_bot_075x", "open_loop_bot", 0.75, "bot"))  # fmt: skip


def usable_cpus() -> int | None:
    """The cores this process may run on (a container's share, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def cpu_info() -> dict[str, Any]:
    """The CPU's model name, torch's kernel capability and the bf16 matrix features."""
    import torch

    name = ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass  # not Linux: platform's answer, and the features unknown
    known = bool(flags)
    return {
        "cpu_model": name or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": ("avx512_bf16" in flags) if known else None,
        "amx": bool(flags & {"amx_bf16", "amx_tile", "amx_int8"}) if known else None,
        "cpus": usable_cpus(),
    }


def cpu_label(machine: dict[str, Any]) -> str:
    """One line naming the CPU: goes next to every table."""

    def yes(value: Any) -> str:
        return "?" if value is None else "yes" if value else "no"

    return (
        f"{machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} cores, "
        f"capability {machine.get('cpu_capability', '?')}, "
        f"AVX512-BF16 {yes(machine.get('avx512_bf16'))}, AMX {yes(machine.get('amx'))}"
    )


def _tags(entry: dict[str, Any]) -> str:
    return f"{entry.get('dtype', '?')}, {entry.get('threads', '?')} thr"


def _run(runs: list[dict[str, Any]], system: str, concurrency: int) -> dict[str, Any] | None:
    for run in runs:
        if run["system"] == system and run["concurrency"] == concurrency:
            return run
    return None


def fastest_seed(results: dict[str, Any]) -> dict[str, Any] | None:
    """The faster of the seed loop's runs (its dtypes) at the most people."""
    seeds: list[dict[str, Any]] = [
        r for r in results.get("runs", []) if r["system"].startswith("seed loop")
    ]
    if not seeds:
        return None
    most = max(r["concurrency"] for r in seeds)
    return max((r for r in seeds if r["concurrency"] == most), key=lambda r: r["tokens_per_s"])


def capacity_run(results: dict[str, Any]) -> dict[str, Any] | None:
    """The bot's closed loop at 16 conversations: its messages/s are the bot's capacity."""
    return _run(results.get("runs", []), "this bot", 16)


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def worst_turn(by_turn: list[float]) -> tuple[int, float | None]:
    """The slowest turn (from 1) and its first token over turn 1's (None: < 2 turns)."""
    if len(by_turn) < 2:
        return 0, None
    worst = max(range(len(by_turn)), key=by_turn.__getitem__)
    return worst + 1, _div(by_turn[worst], by_turn[0])


def rate_at(rates: list[dict[str, Any]], multiple: float) -> dict[str, Any] | None:
    """The open-loop rate run at `multiple`, else the nearest (the higher on a tie)."""
    return min(rates, key=lambda r: (abs(r["multiple"] - multiple), -r["multiple"]), default=None)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with its figure from this run, met or missed (None:
    not measured in this run, with why in `detail`)."""
    runs: list[dict[str, Any]] = results.get("runs", [])
    values: dict[str, tuple[float | None, str]] = {}

    bots = [r for r in runs if r["system"] == "this bot"]
    bot16 = _run(runs, "this bot", 16) or (
        max(bots, key=lambda r: r["concurrency"]) if bots else None
    )
    seed = fastest_seed(results)
    if bot16 and seed:
        values["tokens_per_s_16_vs_seed"] = (
            _div(bot16["tokens_per_s"], seed["tokens_per_s"]),
            f"this bot at {bot16['concurrency']} ({_tags(bot16)}) {bot16['tokens_per_s']} tok/s "
            f"vs {seed['system']} ({_tags(seed)}) {seed['tokens_per_s']} tok/s",
        )
    else:
        values["tokens_per_s_16_vs_seed"] = (None, "not run")
    peer = _run(runs, "llama-cpp-python", 1)
    for key, bot in (
        ("tokens_per_s_16_vs_llama_cpp", bot16),
        ("tokens_per_s_1_vs_llama_cpp", _run(runs, "this bot", 1)),
    ):
        if bot and peer:
            values[key] = (
                _div(bot["tokens_per_s"], peer["tokens_per_s"]),
                f"{bot['tokens_per_s']} vs {peer['tokens_per_s']} tok/s ({_tags(bot)} / "
                f"{_tags(peer)})",
            )
        else:
            values[key] = (None, results.get("llama_cpp", "not run") if bot else "not run")

    turns = results.get("turns") or {}
    at: dict[str, float] = turns.get("at", {})
    last = 20 if "20" in at else max((int(n) for n in at), default=0)
    if last > 1 and "1" in at:
        note = "" if last == 20 else f" (turn {last}: the run stopped there)"
        values["ttft_turn_20_vs_turn_1"] = (
            _div(at[str(last)], at["1"]),
            f"{at[str(last)]} s / {at['1']} s ({_tags(turns)}){note}",
        )
    else:
        values["ttft_turn_20_vs_turn_1"] = (None, "not run")
    by_turn: list[float] = turns.get("ttft_by_turn_s", [])
    worst, ratio = worst_turn(by_turn)
    stopped = " (the run stopped there)" if turns.get("cut_short") else ""
    values["ttft_worst_turn_vs_turn_1"] = (
        (ratio, f"turn {worst}: {by_turn[worst - 1]} s / {by_turn[0]} s, of turns "
                f"1-{len(by_turn)}{stopped}, {turns.get('typing_s', 0)} s typing ({_tags(turns)})")
        if ratio is not None
        else (None, "not run")
    )  # fmt: skip

    paste = results.get("long_history") or {}
    after, fresh = paste.get("after_paste_ttft_median_s"), paste.get("fresh_ttft_median_s")
    values["ttft_after_paste_vs_fresh"] = (
        _div(after, fresh),
        f"median {after} s / {fresh} s ({_tags(paste)})" if after else "not run",
    )

    hol = results.get("head_of_line") or {}
    behind, alone = hol.get("behind_long_ttft_median_s"), hol.get("alone_ttft_median_s")
    values["head_of_line_vs_alone"] = (
        _div(behind, alone),
        f"median {behind} s / {alone} s ({_tags(hol)})" if behind else "not run",
    )

    refused: dict[str, int] = {}  # a message answered "busy" got no reply at all
    for prefix, name, multiple, whose in OPEN_TARGETS:
        top = rate_at((results.get(name) or {}).get("rates", []), multiple)
        if top is None:
            values[f"{prefix}_ttft_p95_s"] = values[f"{prefix}_no_first_token"] = (None, "not run")
            continue
        where = f"at {top['multiple']}x the {whose}'s capacity = {top['rate_per_s']} msg/s"
        values[f"{prefix}_ttft_p95_s"] = (
            top["ttft_p95_s"],
            f"{where}, {top['arrivals']} arrivals, {top['unfinished']} cut, "
            f"{top.get('refused', 0)} refused busy ({_tags(top)})",
        )
        values[f"{prefix}_no_first_token"] = (
            top.get("no_first_token"),
            f"{where}: of {top['arrivals']}, {top.get('cut_waiting', '?')} cut still waiting, "
            f"{top.get('refused', 0)} refused busy; slowest first token {top.get('ttft_max_s')} s",
        )
        refused[f"{prefix}_ttft_p95_s"] = top.get("refused", 0)
    rates = (results.get("open_loop") or {}).get("rates", [])
    bot_rates = (results.get("open_loop_bot") or {}).get("rates", [])

    single = results.get("single") or {}
    values["single_reply_vs_bare_generate"] = (
        _div(single.get("engine_s"), single.get("bare_s")),
        f"{single.get('engine_s')} s / {single.get('bare_s')} s ({_tags(single)})"
        if single
        else "not run",
    )

    lags: list[tuple[float, str]] = [
        (r["loop_lag_p99_ms"], f"closed loop at {r['concurrency']}")
        for r in bots
        if r.get("loop_lag_p99_ms") is not None
    ]
    lags += [
        (r["loop_lag_p99_ms"], f"open loop at {r['multiple']}x {whose}")
        for whose, group in (("seed", rates), ("bot", bot_rates))
        for r in group
        if r.get("loop_lag_p99_ms") is not None
    ]
    for name in ("long_history", "head_of_line", "turns"):
        lag = (results.get(name) or {}).get("loop_lag_p99_ms")
        if lag is not None:
            lags.append((lag, name.replace("_", " ")))
    if lags:
        lag_ms, where = max(lags)
        values["loop_lag_p99_ms"] = (lag_ms, f"worst: {where}")
    else:
        values["loop_lag_p99_ms"] = (None, "not run")

    startup = results.get("startup") or {}
    values["startup_warm_cache_s"] = (
        startup.get("warm_start_s"),
        f"median of {startup.get('runs')} (`python -m bot console`, warm cache)"
        if startup
        else "not run",
    )

    out = []
    for key, what, op, target, unit in TARGETS:
        value, detail = values[key]
        met = None if value is None else value >= target if op == ">=" else value <= target
        if refused.get(key) and met:
            met = False
        out.append(
            {"key": key, "what": what, "value": value, "unit": unit, "target": f"{op} {target:g}",
             "met": met, "detail": detail}
        )  # fmt: skip
    return out


def extras(results: dict[str, Any]) -> dict[str, Any]:
    """Figures kept beside the targets (no target of their own)."""
    runs: list[dict[str, Any]] = results.get("runs", [])
    out: dict[str, Any] = {}
    bot16 = _run(runs, "this bot", 16)
    seed = fastest_seed(results)
    if bot16 and seed:
        out["p95_latency_16_vs_seed"] = _div(bot16["latency_p95_s"], seed["latency_p95_s"])
    seeds = [r for r in runs if r["system"].startswith("seed loop") and r["concurrency"] > 1]
    for r in seeds:
        out[f"seed_tokens_per_s_{r['dtype']}"] = r["tokens_per_s"]
    if seed:
        out["seed_faster_dtype"] = seed["dtype"]
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def lines(results: dict[str, Any]) -> list[str]:
    """The printed report: every table headed by the CPU, dtype and threads on each row."""
    machine = results.get("machine", {})
    out = [
        "",
        f"CPU: {cpu_label(machine)}; torch {machine.get('torch', '?')}, "
        f"{machine.get('torch_threads', '?')} threads; bot dtype {machine.get('dtype', '?')}",
    ]
    if results.get("runs"):
        out += _closed_loop_lines(results["runs"])
    out += _workload_lines(results)
    out += _target_lines(results)
    return out


def _closed_loop_lines(runs: list[dict[str, Any]]) -> list[str]:
    out = ["", "Closed loop (each conversation sends its next message when its reply is done)"]
    head = ("system", "dtype", "thr", "conc", "msgs", "tok/s", "p50 s", "p95 s", "ttft50",
            "lag99 ms", "RSS MB")  # fmt: skip
    out.append("{:<22}{:>11}{:>4}{:>5}{:>7}{:>8}{:>8}{:>8}{:>8}{:>10}{:>8}".format(*head))
    for s in runs:
        msgs = f"{s['messages']}" + ("*" if s.get("cut_short") else "")
        out.append(
            f"{s['system']:<22}{s['dtype']:>11}{s['threads']:>4}{s['concurrency']:>5}{msgs:>7}"
            f"{s['tokens_per_s']:>8.1f}{s['latency_p50_s']:>8.2f}{s['latency_p95_s']:>8.2f}"
            f"{s['ttft_p50_s']:>8.3f}{_fmt(s['loop_lag_p99_ms'], 1):>10}{s['peak_rss_mb']:>8.0f}"
        )
    if any(s.get("cut_short") for s in runs):
        out.append("  * stopped at its time budget: rates hold for the messages that ran")
    return out


def _workload_lines(results: dict[str, Any]) -> list[str]:
    out: list[str] = []

    open_loop = results.get("open_loop") or {}
    if open_loop.get("rates"):
        out += _open_loop_lines(
            f"Open loop: Poisson arrivals (seed {open_loop.get('seed')}), rates as multiples of "
            f"the seed loop's capacity {open_loop.get('seed_capacity_msg_per_s')} msg/s "
            f"({open_loop.get('seed_system')})",
            open_loop["rates"],
        )
    bot = results.get("open_loop_bot") or {}
    if bot.get("rates"):
        out += _open_loop_lines(
            f"Open loop: Poisson arrivals (seed {bot.get('seed')}), rates as multiples of this "
            f"bot's capacity {bot.get('capacity_msg_per_s')} msg/s ({bot.get('capacity_from')})",
            bot["rates"],
        )

    paste = results.get("long_history") or {}
    if paste:
        out += [
            "",
            f"Long history ({_tags(paste)}): a {paste['paste_chars']:,}-character paste "
            f"(first token {paste['paste_ttft_s']} s, reply {paste['paste_reply_s']} s, "
            f"cut to fit: {paste['paste_truncated']}), "
            "then short questions",
            f"  first token after the paste: {paste['after_paste_ttft_s']} s; "
            f"in a fresh conversation: {paste['fresh_ttft_s']} s",
        ]
    hol = results.get("head_of_line") or {}
    if hol:
        out += [
            "",
            f"Head of line ({_tags(hol)}): a one-line question {hol['delay_s']} s after "
            f"a {hol['long_chars']:,}-character message in another conversation",
            f"  first token behind it: {hol['behind_long_ttft_s']} s; alone: "
            f"{hol['alone_ttft_s']} s; the long message's first token: {hol['long_ttft_s']} s "
            f"(cut to fit: {hol.get('long_truncated')})",
        ]
    turns = results.get("turns") or {}
    if turns.get("at"):
        at = ", ".join(f"turn {n}: {t} s" for n, t in turns["at"].items())
        by_turn = turns.get("ttft_by_turn_s", [])
        worst, ratio = worst_turn(by_turn)
        out += [
            "",
            f"First token by turn ({_tags(turns)}, memory as configured, "
            f"{turns.get('typing_s', 0)} s typing between turns): {at}",
            f"  worst: turn {worst}, {_fmt(ratio, 2)}x turn 1; every turn (s):",
        ]
        for start in range(0, len(by_turn), 10):
            row = " ".join(f"{t:6.3f}" for t in by_turn[start : start + 10])
            out.append(f"  {start + 1:>4}-{min(start + 10, len(by_turn)):<4}{row}")
    single = results.get("single") or {}
    if single:
        out.append(
            f"One message ({_tags(single)}): engine {single['engine_s']} s, bare generate "
            f"{single['bare_s']} s"
        )
    startup = results.get("startup") or {}
    if startup:
        out.append(f"Warm start to ready: {startup['warm_start_s']} s")

    return out


def _open_loop_lines(title: str, rates: list[dict[str, Any]]) -> list[str]:
    late = f">{rates[0].get('late_s', 10):g}s"
    head = ("x", "msg/s", "sent", "done", "cut", "busy", "ttft p50", "ttft p95", "ttft max",
            late, "p95 s", "tok/s", "lag99 ms", "dtype", "thr")  # fmt: skip
    out = ["", title]
    out.append("{:>6}{:>9}{:>6}{:>6}{:>5}{:>5}{:>10}{:>10}{:>9}{:>6}{:>8}{:>8}{:>10}{:>11}{:>4}"
               .format(*head))  # fmt: skip
    for r in rates:
        out.append(
            f"{r['multiple']:>6}{r['rate_per_s']:>9.3f}{r['arrivals']:>6}{r['finished']:>6}"
            f"{r['unfinished']:>5}{r.get('refused', 0):>5}"
            f"{r['ttft_p50_s']:>10.3f}{r['ttft_p95_s']:>10.3f}{_fmt(r.get('ttft_max_s'), 3):>9}"
            f"{_fmt(r.get('no_first_token')):>6}{r['latency_p95_s']:>8.2f}{r['tokens_per_s']:>8.1f}"
            f"{_fmt(r.get('loop_lag_p99_ms'), 1):>10}{r['dtype']:>11}{r['threads']:>4}"
        )
    out.append(f"  {late}: messages with no first token by then (cut while waiting, or busy)")
    return out


def _target_lines(results: dict[str, Any]) -> list[str]:
    machine = results.get("machine", {})
    out = ["", f"Targets ({cpu_label(machine)}; bot dtype {machine.get('dtype', '?')}, "
            f"{machine.get('torch_threads', '?')} threads)"]  # fmt: skip
    for r in results.get("ratios", []):
        state = "not measured" if r["met"] is None else "met" if r["met"] else "MISSED"
        value = "-" if r["value"] is None else f"{r['value']:g} {r['unit']}"
        out.append(f"  {r['what']:<48}{value:>12}  target {r['target']:<8} {state:<13}")
        out.append(f"      {r['detail']}")
    for key, value in (results.get("extras") or {}).items():
        out.append(f"  {key:<48}{_fmt(value):>12}")
    return out


def chart(results: dict[str, Any], path: Path) -> str | None:
    """Draw the chart; without matplotlib, say how to get it instead (None: drawn)."""
    try:
        import matplotlib
    except ImportError:
        return f"chart: skipped, matplotlib is not installed: {CHART_HINT}"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("runs", [])
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for system in dict.fromkeys(r["system"] for r in runs):
        rows = sorted((r for r in runs if r["system"] == system), key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in rows]
        style = "o-" if len(rows) > 1 else "s"
        dtype = rows[0]["dtype"]
        label = system if dtype in system else f"{system} ({dtype})"
        left.plot(xs, [r["tokens_per_s"] for r in rows], style, label=label)
        middle.plot(xs, [r["latency_p95_s"] for r in rows], style, label=label)
    for axis, title in ((left, "aggregate tokens/s"), (middle, "p95 reply latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent conversations (closed loop)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    drawn = False
    for name, whose in (("open_loop", "seed loop's"), ("open_loop_bot", "bot's")):
        rates = (results.get(name) or {}).get("rates", [])
        if rates:
            xs = [r["multiple"] for r in rates]
            right.plot(xs, [r["ttft_p50_s"] for r in rates], "o-", label=f"p50, x {whose}")
            right.plot(xs, [r["ttft_p95_s"] for r in rates], "o-", label=f"p95, x {whose}")
            drawn = True
    if drawn:
        right.axhline(2.0, color="grey", linestyle=":", label="target p95 (3x seed, 0.75x bot)")
        right.legend(fontsize=8)
    right.set_xlabel("Poisson arrival rate, x capacity (the seed loop's or the bot's)")
    right.set_title("open loop: time to first token (s)")
    right.grid(alpha=0.3)
    machine = results.get("machine", {})
    figure.suptitle(
        f"SmolLM2-135M on {cpu_label(machine)}; bot {machine.get('dtype')}, "
        f"{machine.get('torch_threads')} threads: python -m bench",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
