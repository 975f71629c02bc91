"""The console adapter and the `python -m bot` entry point, on the bundled model."""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import io
import logging
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import redis

from adapters.console import CONVERSATION, HELP, ConsoleAdapter
from bot.engine import COMMAND_FAILED, Engine
from bot.forgetting import describe
from bot.inference.loader import LoadedModel
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey
from bot.store.forgetting import Forgotten
from bot.store.memory import InProcessMemory
from bot.store.schema import redis_key
from tests.conftest import REPO, RedisServer, bot_env, greedy, run_bot
from tests.scripted import ScriptedModel

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
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=4)), memory)
    output = await run_console(engine, "/help\nHello\n\n   \nHow are you?\n/reset\nHi again\n")
    assert output.startswith(HELP + "\n")
    assert "Conversation forgotten.\n" in output
    # Blank lines are not messages: three messages, and only the last after /reset.
    assert [t.content for t in await memory.history(CONVERSATION) if t.role == "user"] == [
        "Hi again"
    ]
    await engine.close()


async def test_interactive_mode_streams_after_a_prompt(bundled: LoadedModel) -> None:
    engine = Engine(LocalBackend(greedy(bundled, max_new_tokens=8)), InProcessMemory(20, 3600))
    output = await run_console(engine, "What is the capital of France?\n/quit\nnever read\n", True)
    assert "you> bot> " in output and "Paris" in output
    assert output.count("you> ") == 2  # /quit ends the session
    await engine.close()


async def test_forget_deletes_what_was_said_at_the_console() -> None:
    memory = InProcessMemory(20, 3600)
    engine = Engine(LocalBackend(ScriptedModel("Noted.")), memory)
    output = await run_console(engine, "My name is Ada.\nI live in Paris.\n/forget\n/forget\n")
    await engine.close()
    assert output.splitlines() == [
        "Noted.",
        "Noted.",
        describe(Forgotten(turns=2, conversations=1)),
        describe(Forgotten(turns=0, conversations=0)),  # nothing left the second time
    ]
    assert await memory.history(CONVERSATION) == []
    assert "/forget" in HELP


async def test_retry_and_usage_at_the_console() -> None:
    memory = InProcessMemory(20, 3600)
    answers = iter(["First.", "Second.", "Third."])
    engine = Engine(LocalBackend(ScriptedModel(lambda _t: next(answers))), memory,
                    daily_tokens=1000)  # fmt: skip
    output = await run_console(engine, "/retry\nHello\n/retry\n/usage\n")
    lines = output.splitlines()
    assert lines[:3] == ["Nothing to write again yet: send a message first.", "First.", "Second."]
    assert lines[3].startswith("Today you've used ") and "of your 1,000 tokens" in lines[3]
    assert [t.content for t in await memory.history(CONVERSATION)] == ["Hello", "Second."]
    assert "/retry" in HELP and "/usage" in HELP
    await engine.close()


async def test_past_the_daily_limit_the_console_says_so_once_then_nothing() -> None:
    engine = Engine(LocalBackend(ScriptedModel("x" * 80)), InProcessMemory(20, 3600),
                    daily_tokens=5)  # fmt: skip
    output = await run_console(engine, "one\ntwo\nthree\n")
    lines = output.splitlines()
    assert lines[0] == "x" * 80
    assert "allowance of 5 tokens" in lines[1]
    assert len(lines) == 2  # the third: silence
    await engine.close()


async def test_a_failed_command_is_answered_and_the_session_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unreachable(InProcessMemory):
        async def conversations_of(self, platform: str, user_id: str) -> list[ConversationKey]:
            raise ConnectionError("memory unreachable")

    engine = Engine(LocalBackend(ScriptedModel("Noted.")), Unreachable(20, 3600))
    output = await run_console(engine, "hello\n/forget\nafter\n")
    await engine.close()
    # Piped: still one line per input line.
    assert output.splitlines() == ["Noted.", COMMAND_FAILED, "Noted."]
    assert any("/forget failed" in r.getMessage() and r.exc_info for r in caplog.records)


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
        if "Running: console" in line or not line:  # SIGTERM is handled from here
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
        if "Running: console" in line or not line:  # SIGTERM is handled from here
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


class TtyConsole:
    """`python -m bot console` on a pseudo-terminal (120 x 40), as a person runs it:
    stdin, stdout and stderr all on the one terminal, whose screen is `screen`."""

    def __init__(self, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot", "console"],
            env=env,
            cwd=REPO,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,  # the terminal is its controlling one
        )
        os.close(slave)
        self.fd = master
        self.screen = ""
        self._read = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _more(self, timeout: float) -> bool:
        """Read what the bot wrote; False at its end."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            data = b""
        self.screen += self._decoder.decode(data, final=not data)
        return bool(data)

    def until(self, text: str, timeout: float = 120) -> str:
        """What the screen got since the last call, up to and including `text`."""
        deadline = time.monotonic() + timeout
        while (found := self.screen.find(text, self._read)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._more(left):
                raise AssertionError(f"{text!r} never shown; the screen:\n{self.screen}")
        start, self._read = self._read, found + len(text)
        return self.screen[start : self._read]

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def end(self, timeout: float = 60) -> int:
        """Ctrl-D at the prompt; the exit code."""
        self.type("\x04")
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self._more(left):
            pass  # until the bot closes the terminal
        return self.process.wait(timeout=5)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.fd)


BARS_OF_TRANSFORMERS = ("de-quantizing", "Loading weights", "Writing model shards")


def assert_no_log_lines(screen: str) -> None:
    for text in (
        " INFO ",
        "Replied in",
        "Still loading",
        "bot.inference.loader",
        *BARS_OF_TRANSFORMERS,
    ):
        assert text not in screen, f"{text!r} on the screen:\n{screen}"


def test_first_start_at_a_terminal_shows_one_bar_then_a_clean_conversation(
    tmp_path: Path,
) -> None:
    """`make run` on a fresh machine: a status, one progress bar while the bundled model
    is converted, "Ready", then replies that each end their line; the log goes to
    LOG_FILE only."""
    log_file = tmp_path / "bot.log"
    console = TtyConsole(
        bot_env(
            MODEL_CACHE_DIR=str(tmp_path / "cache"),
            LOG_FILE=str(log_file),
            TEMPERATURE="0",
            MAX_NEW_TOKENS="24",
        )
    )
    try:
        start = console.until("you> ", timeout=240)
        console.type("What is the capital of France?\r")
        first = console.until("you> ")
        console.type("Thank you!\r")
        second = console.until("you> ")
        assert console.end() == 0
    finally:
        console.close()
    assert_no_log_lines(console.screen)
    starting, status, rest = start.split("\r\n", 2)
    assert starting == "Starting…"  # at once, before torch is imported
    assert status == "Loading the model (first start: converting it once, ~20 s)…"
    # One bar, redrawn in place, ending at 100 % on its own line before "Ready".
    assert re.fullmatch(
        r"(\rConverting the model: +\d+%\|[^\r\n]*)+\r\n"
        r"Ready \(\d+ s\)\.\r\nChatting with the bot\. /help lists the commands\.\r\nyou> ",
        rest,
    ), rest
    assert "Converting the model: 100%" in rest
    assert re.fullmatch(
        r"What is the capital of France\?\r\nbot> [^\r\n]*Paris[^\r\n]*\r\nyou> ", first
    )
    assert second.startswith("Thank you!\r\nbot> ") and second.endswith("\r\nyou> ")
    assert console.screen.endswith("you> \r\n")  # Ctrl-D: the shell's prompt starts afresh

    log = log_file.read_text(encoding="utf-8")
    assert "INFO bot.inference.loader: First start: converting the bundled model" in log
    assert "INFO bot.inference.loader: Model ready in" in log
    assert log.count("INFO bot.engine: Replied in console:terminal to message") == 2


def test_later_start_at_a_terminal(model_cache_dir: Path, bundled: LoadedModel) -> None:
    # `bundled` first: the session's model cache exists, so this start is the cached one.
    console = TtyConsole(bot_env(MODEL_CACHE_DIR=str(model_cache_dir), LOG_LEVEL="DEBUG"))
    try:
        start = console.until("you> ", timeout=120)
        assert console.end() == 0
    finally:
        console.close()
    assert_no_log_lines(console.screen)
    assert "DEBUG" not in console.screen  # CONSOLE_LOG_LEVEL (WARNING) holds the terminal
    assert start.startswith("Starting…\r\nLoading the model…\r\n\rLoading the model: ")
    assert re.search(r"Loading the model: 100%[^\r\n]*\r\nReady \(\d+ s\)\.\r\n", start)
