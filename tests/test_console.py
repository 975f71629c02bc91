"""The console adapter and the `python -m bot` entry point, on the bundled model."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from adapters.console import CONVERSATION, HELP, ConsoleAdapter
from bot.engine import Engine
from bot.memory import InProcessMemory, redis_key
from bot.messages import ConversationKey
from bot.model import LoadedModel
from tests.conftest import REPO, RedisServer, bot_env, greedy, run_bot

pytestmark = pytest.mark.model


def test_piped_question_gets_an_answer(model_cache_dir: Path, bundled: LoadedModel) -> None:
    # `bundled` first: the session's model cache exists, so this start is the cached one.
    result = run_bot(
        "console",
        env=bot_env(TEMPERATURE="0", MODEL_CACHE_DIR=str(model_cache_dir)),
        stdin="What is the capital of France?\n",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Model ready" in result.stderr  # logs go to stderr, replies to stdout
    assert "Model ready" not in result.stdout


async def run_console(engine: Engine, text: str, interactive: bool = False) -> str:
    out = io.StringIO()
    adapter = ConsoleAdapter(io.StringIO(text), out, interactive=interactive)
    await asyncio.wait_for(adapter.run(engine, asyncio.Event()), timeout=120)
    return out.getvalue()


async def test_commands_and_one_reply_per_message(bundled: LoadedModel) -> None:
    memory = InProcessMemory(20, 3600)
    engine = Engine(greedy(bundled, max_new_tokens=4), memory)
    output = await run_console(engine, "/help\nHello\n\n   \nHow are you?\n/reset\nHi again\n")
    assert output.startswith(HELP + "\n")
    assert "Conversation forgotten.\n" in output
    # Blank lines are not messages: three messages, and only the last after /reset.
    assert [t.content for t in await memory.history(CONVERSATION) if t.role == "user"] == [
        "Hi again"
    ]
    await engine.close()


async def test_interactive_mode_streams_after_a_prompt(bundled: LoadedModel) -> None:
    engine = Engine(greedy(bundled, max_new_tokens=8), InProcessMemory(20, 3600))
    output = await run_console(engine, "What is the capital of France?\n/quit\nnever read\n", True)
    assert "you> bot> " in output and "Paris" in output
    assert output.count("you> ") == 2  # /quit ends the session
    await engine.close()


def test_sigterm_while_waiting_for_input_exits_0(
    model_cache_dir: Path, bundled: LoadedModel
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "console"],
        env=bot_env(MODEL_CACHE_DIR=str(model_cache_dir)),
        cwd=REPO,
        stdin=subprocess.PIPE,  # left open: the bot is waiting for a line
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if "Model ready" in line or not line:
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.communicate()


def test_sigterm_during_a_long_generation_exits_within_the_grace(
    model_cache_dir: Path, bundled: LoadedModel, redis_server: RedisServer
) -> None:
    """SIGTERM mid-reply: the reply gets SHUTDOWN_GRACE_SECONDS, then its row is
    stopped and the bot exits 0; the lines queued behind it are not answered, and
    memory holds no half exchange."""
    grace = 2
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "console"],
        env=bot_env(
            MODEL_CACHE_DIR=str(model_cache_dir),
            TEMPERATURE="0",
            MAX_NEW_TOKENS="1000",
            REPETITION_PENALTY="1.0",
            SHUTDOWN_GRACE_SECONDS=str(grace),
            REDIS_URL=redis_server.url,
        ),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stderr is not None
    process.stdin.write("Count from one to five hundred, one number per line.\n")
    process.stdin.write("".join(f"Queued line {i}\n" for i in range(20)))
    process.stdin.flush()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if "Model ready" in line or not line:
            break
    time.sleep(3)  # well into the first reply (1,000 tokens take minutes here)
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        # Generous: a bound that the old engine (which ran the queue for minutes) fails.
        assert process.wait(timeout=grace + 30) == 0
        waited = time.monotonic() - stopped
    finally:
        process.kill()
        out, err = process.communicate()
    assert "Traceback" not in err, err
    assert out.count("\n") <= 1, "queued lines are not answered once stopping"
    stored = redis.Redis.from_url(redis_server.url).lrange(
        redis_key(ConversationKey("console", "terminal")), 0, -1
    )
    assert len(stored) in (0, 2), "whole exchanges only"
    logging.getLogger(__name__).info("exited %.1f s after SIGTERM (grace %d s)", waited, grace)
