"""Chat with the bot in a terminal, through the same engine and memory as the platforms.

Interactive (stdin is a terminal): a prompt, replies streamed as they are written,
each ending on its own line, and the commands below. Piped: one message per line,
one reply per line, exit at end of input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from typing import TextIO

from bot import personas
from bot.engine import COMMAND_FAILED, Engine, ReplyStream
from bot.forgetting import describe
from bot.logs import Terminal
from bot.messages import ConversationKey, Message
from bot.usage import describe_usage

log = logging.getLogger(__name__)

CONVERSATION = ConversationKey("console", "terminal")
USER = "console"  # the one person at this terminal, as the engine knows them
HELP = """Commands:
  /reset  forget this conversation
  /forget delete everything you said that the bot stored, and its replies
  /persona set <text> | show | clear
          give this conversation its own system prompt
  /retry  write the last reply again (a new answer to your last message)
  /usage  the tokens you used today, and the daily limit
  /help   show this help
  /quit   leave (Ctrl-D works too)
Anything else is a message to the bot."""


class ConsoleAdapter:
    name = "console"

    def __init__(
        self,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        interactive: bool | None = None,
        terminal: Terminal | None = None,
    ) -> None:
        """`terminal`: the one the log handler shares (bot.logs), so that log records
        never land inside a line written here."""
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout
        self._interactive = self._in.isatty() if interactive is None else interactive
        self._terminal = terminal or Terminal(self._out)
        self._count = 0
        self._last = ""  # the id of the last message sent here (for /retry)

    def _write(self, text: str, *, prompt: bool = False) -> None:
        self._terminal.write(text, prompt=prompt)

    def _start_reader(self, lines: asyncio.Queue[str | None]) -> None:
        """Read stdin on a daemon thread: readline blocks, and a thread stuck in it
        must not keep the process alive after SIGTERM."""
        loop = asyncio.get_running_loop()

        def hand_over(line: str | None) -> None:
            # RuntimeError: the loop has closed, the bot is exiting.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lines.put_nowait, line)

        def read() -> None:
            for line in iter(self._in.readline, ""):
                hand_over(line)
            hand_over(None)

        threading.Thread(target=read, name="console-stdin", daemon=True).start()

    async def _next_line(self, lines: asyncio.Queue[str | None], stop: asyncio.Event) -> str | None:
        """The next line, or None at end of input or when the bot is stopping.

        Once stopping, lines already read but not yet answered are left unanswered."""
        if stop.is_set():
            return None
        if self._interactive:
            self._write("you> ", prompt=True)
        line = asyncio.ensure_future(lines.get())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([line, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not line.done() or stop.is_set():
            line.cancel()
            return None
        text = line.result()
        if text is None:
            return None
        if self._interactive:
            self._terminal.entered()
        return text.rstrip("\r\n")

    def _message(self, text: str) -> Message:
        self._count += 1
        self._last = str(self._count)
        return Message(
            conversation=CONVERSATION,
            author_id=USER,
            author_name="you",
            text=text,
            message_id=str(self._count),
            is_direct=True,
        )

    async def _command(self, engine: Engine, text: str) -> str | None:
        """The answer to a console command, or None when `text` is a message. A failed
        command (memory unreachable) gets an answer; the session goes on."""
        word = text.lower()
        try:
            if word == "/help":
                return HELP
            if word == "/reset":
                await engine.reset(CONVERSATION)
                return "Conversation forgotten."
            if word == "/forget":
                return describe(await engine.forget_user(CONVERSATION.platform, USER))
            if word == "/usage":
                return describe_usage(await engine.usage(CONVERSATION.platform, USER))
            if word.startswith("/persona"):
                command = personas.parse(text[len("/persona") :])
                answer = await personas.run(engine, CONVERSATION, *command) if command else None
                return answer or personas.USAGE
        except Exception:
            log.exception("The console command %s failed", word.split()[0])
            return COMMAND_FAILED
        return None

    async def run(self, engine: Engine, stop: asyncio.Event) -> None:
        if self._interactive:
            self._write("Chatting with the bot. /help lists the commands.\n")
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._start_reader(lines)
        while (line := await self._next_line(lines, stop)) is not None:
            text = line.strip()
            if not text:
                continue
            if text.lower() in ("/quit", "/exit"):
                break
            answer = await self._command(engine, text)
            if answer is not None:
                self._write(answer + "\n")
                continue
            if text.lower() == "/retry":
                if not self._last:
                    self._write("Nothing to write again yet: send a message first.\n")
                    continue
                stream = engine.regenerate(CONVERSATION, self._last, USER)
            else:
                stream = engine.stream(self._message(text))
            await self._show(stream)
        if self._interactive:
            self._terminal.end_line()  # after Ctrl-D at the prompt: the shell's on its own line

    async def _show(self, stream: ReplyStream) -> None:
        """A reply as it is written (interactive) or whole, on its own line; a
        refusal (/retry) as its text; a silent one (past the daily limit) as nothing."""
        if self._interactive:
            self._write("bot> ")  # at once: a log record meanwhile goes below it
            async for chunk in stream:
                self._write(chunk)
        else:
            async for _ in stream:
                pass
        reply = stream.reply
        if reply is not None and not reply.silent and (reply.refused or not self._interactive):
            self._write(reply.text + ("" if self._interactive else "\n"))
        if self._interactive:
            self._terminal.end_line()
