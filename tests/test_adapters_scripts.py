"""Scripted models for the adapter tests (Discord and Slack), and their own checks:
a model that holds its reply half-way until released, and one that fails half-way."""

from __future__ import annotations

import threading
from collections.abc import Callable

from bot.engine import APOLOGY, Engine
from bot.inference.backend import Prompt
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message, Turn
from bot.store.memory import InProcessMemory
from tests.scripted import ScriptedModel


class GatedModel(ScriptedModel):
    """Streams its first chunk, then waits for `gate` before the rest: a reply that is
    being written while the test does something else in the same conversation."""

    def __init__(self, reply: str = "first part, then the rest", *, chunk: int = 10) -> None:
        super().__init__(reply, chunk=chunk)
        self.gate = threading.Event()
        self.started = threading.Event()

    def generate(
        self, prompt: Prompt, on_text: Callable[[str], None], stop: threading.Event
    ) -> str:
        text = self.reply(prompt.user_text) if callable(self.reply) else self.reply
        on_text(text[: self.chunk])
        self.started.set()
        self.gate.wait(30)
        on_text(text[self.chunk :])
        return text


class FailsMidway(ScriptedModel):
    """Streams `text` up to `fail_at` characters, then raises: a reply that already
    spans several platform messages when it fails."""

    def __init__(self, text: str, fail_at: int, *, chunk: int = 500) -> None:
        super().__init__(text, chunk=chunk)
        self.fail_at = fail_at

    def generate(
        self, prompt: Prompt, on_text: Callable[[str], None], stop: threading.Event
    ) -> str:
        text = str(self.reply)
        for start in range(0, self.fail_at, self.chunk):
            on_text(text[start : min(start + self.chunk, self.fail_at)])
        raise RuntimeError("scripted failure mid-reply")


class CountingMemory(InProcessMemory):
    """In-process memory that notes which conversations' history was read."""

    def __init__(self) -> None:
        super().__init__(20, 3600)
        self.looked_up: list[ConversationKey] = []

    async def history(self, conversation: ConversationKey) -> list[Turn]:
        self.looked_up.append(conversation)
        return await super().history(conversation)


def message(text: str) -> Message:
    return Message(ConversationKey("test", "c"), "u", "u", text)


async def test_gated_model_holds_its_reply_until_released() -> None:
    model = GatedModel("0123456789abc", chunk=10)
    engine = Engine(LocalBackend(model), InProcessMemory(20, 3600))
    stream = engine.stream(message("go"))
    chunks = stream.__aiter__()
    assert await chunks.__anext__() == "0123456789"
    assert not model.gate.is_set()
    model.gate.set()
    rest = [chunk async for chunk in chunks]
    assert "".join(rest) == "abc"
    await engine.close()


async def test_fails_midway_ends_in_the_apology() -> None:
    engine = Engine(LocalBackend(FailsMidway("x" * 100, 60, chunk=25)), InProcessMemory(20, 3600))
    stream = engine.stream(message("go"))
    chunks = [chunk async for chunk in stream]
    assert "".join(chunks[:-1]) == "x" * 60 and chunks[-1].endswith(APOLOGY)
    assert stream.reply is not None and not stream.reply.ok
    await engine.close()
