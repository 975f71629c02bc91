"""Logging: what reaches the terminal and LOG_FILE, scrubbed, and never inside a line of
the console's conversation."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adapters.console import ConsoleAdapter
from bot.engine import Engine
from bot.inference.backend import Prompt
from bot.inference.local import LocalBackend
from bot.logs import RedactingFormatter, Terminal, TerminalHandler, setup_logging, status
from bot.store.memory import InProcessMemory
from tests.conftest import REPO, bot_env, run_bot
from tests.scripted import ScriptedModel

SECRET = "xoxb-1234-very-secret-token"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers: put pytest's back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_interactive_console_terminal_gets_warnings_and_statuses_the_file_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: None
) -> None:
    log_file = tmp_path / "bot.log"
    setup_logging(
        "INFO",
        [SECRET],
        log_file=log_file,
        terminal=Terminal(io.StringIO()),
        terminal_level="WARNING",
    )
    log = logging.getLogger("bot.test")
    log.info("Replied in %s to message %s", "console:terminal", 1)
    log.warning("Slack said no: token=%s", SECRET)
    log.info("Model ready in 1.2 s: the details", extra=status("Ready (1 s)."))
    log.debug("a debug detail")

    terminal = capsys.readouterr().err
    assert terminal.splitlines()[0].endswith("WARNING bot.test: Slack said no: token=***")
    assert terminal.splitlines()[1:] == ["Ready (1 s)."]  # the status alone, no log line
    assert SECRET not in terminal and "Replied in" not in terminal

    written = log_file.read_text(encoding="utf-8")
    assert "INFO bot.test: Replied in console:terminal to message 1" in written
    assert "WARNING bot.test: Slack said no: token=***" in written
    assert "INFO bot.test: Model ready in 1.2 s: the details" in written
    assert SECRET not in written and "a debug detail" not in written


def test_other_runs_keep_stderr_at_log_level_and_the_file_is_scrubbed_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: None
) -> None:
    log_file = tmp_path / "bot.log"
    setup_logging("INFO", [SECRET], json_lines=True, log_file=log_file)
    log = logging.getLogger("bot.test")
    log.info("Replied", extra=status("not shown anywhere but as a record"))
    try:
        raise ConnectionError(f"https://hooks.example/?token={SECRET}")
    except ConnectionError:
        log.exception("Posting failed")

    stderr = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["level"], e["message"]) for e in stderr] == [
        ("INFO", "Replied"),
        ("ERROR", "Posting failed"),
    ]
    entries = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()]
    assert [e["message"] for e in entries] == ["Replied", "Posting failed"]
    assert "token=***" in entries[1]["traceback"]
    assert SECRET not in log_file.read_text(encoding="utf-8")


def test_a_record_interrupting_the_console_starts_on_its_own_line() -> None:
    screen = io.StringIO()  # stdout and stderr on one terminal
    terminal = Terminal(screen)
    handler = TerminalHandler(screen, logging.WARNING, terminal)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s", [SECRET]))
    log = logging.getLogger("test.terminal")
    log.addHandler(handler)
    log.propagate = False
    try:
        terminal.write("you> ", prompt=True)
        log.warning("Redis went away")  # while the person is at the prompt
        assert screen.getvalue() == "you> \nWARNING Redis went away\nyou> "
        terminal.entered()  # they typed a line and pressed Enter
        terminal.write("bot> The capital")
        log.warning("Slow: %s", SECRET)  # mid-reply
        terminal.write(" is Paris.")
        terminal.end_line()
        terminal.end_line()  # a finished line is not finished twice
        log.info("Replied")  # below the level: not shown
        assert screen.getvalue().endswith("bot> The capital\nWARNING Slow: ***\n is Paris.\n")
    finally:
        log.removeHandler(handler)
        log.propagate = True


class WarnsMidReply(ScriptedModel):
    """Logs a warning (as a library or Redis might) while the reply is being written."""

    def generate(
        self, prompt: Prompt, on_text: Callable[[str], None], stop: threading.Event
    ) -> str:
        on_text("The capital")
        logging.getLogger("bot.test").warning("Something went wrong meanwhile")
        on_text(" is Paris.")
        return "The capital is Paris."


async def test_console_reply_and_prompt_stay_clear_of_log_records() -> None:
    """The console adapter, the engine and the log handler on one screen: the engine's
    INFO lines stay off it, and a warning mid-reply is a line of its own."""
    screen = io.StringIO()
    terminal = Terminal(screen)
    handler = TerminalHandler(screen, logging.WARNING, terminal)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s", []))
    log = logging.getLogger("bot")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    engine = Engine(LocalBackend(WarnsMidReply()), InProcessMemory(20, 3600))
    adapter = ConsoleAdapter(
        io.StringIO("What is the capital of France?\nAgain?\n"), screen, True, terminal
    )
    try:
        await asyncio.wait_for(adapter.run(engine, asyncio.Event()), timeout=30)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        await engine.close()
    output = screen.getvalue()
    warning = "\nWARNING bot.test: Something went wrong meanwhile\n"
    assert output.count(warning) == 2, output  # each on a line of its own
    # Without them, the conversation as it would be: each reply ends its line.
    assert output.replace(warning, "") == (
        "Chatting with the bot. /help lists the commands.\n"
        "you> bot> The capital is Paris.\n"
        "you> bot> The capital is Paris.\n"
        "you> \n"  # the last prompt, its line ended at the end of input
    )


def test_an_unwritable_log_file_is_a_config_error(tmp_path: Path) -> None:
    result = run_bot(
        "console", env=bot_env(LOG_FILE=str(tmp_path / "no-such-dir" / "bot.log")), timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"Invalid configuration: LOG_FILE: cannot write to {tmp_path / 'no-such-dir' / 'bot.log'}"
        ": No such file or directory"
    )


FORGET = """
import sys
from bot.__main__ import main
code = main(sys.argv[1:])
print("imported:", sorted(m for m in ("torch", "transformers") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("redis", [True, False], ids=["with-redis", "without-redis"])
def test_forget_command_needs_no_model(redis: bool, request: pytest.FixtureRequest) -> None:
    env = bot_env()
    if redis:
        env["REDIS_URL"] = request.getfixturevalue("redis_server").url
    result = subprocess.run(
        [sys.executable, "-c", FORGET, "forget", "--platform", "slack", "--user", "U123"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "imported: []" in result.stdout  # neither torch nor transformers
    if redis:
        assert result.returncode == 0, result.stderr
        assert "Deleted 0 turn(s) by slack user U123" in result.stdout
    else:
        assert result.returncode == 2  # the configuration error's exit code
        assert "REDIS_URL is not set" in result.stderr
        assert "Traceback" not in result.stderr


def test_forget_command_arguments_are_checked() -> None:
    result = run_bot("forget", "--platform", "irc", "--user", "x", env=bot_env(), timeout=60)
    assert result.returncode == 2 and "invalid choice: 'irc'" in result.stderr
