"""A scripted model for tests about an adapter alone (not about the model).

It implements bot.inference.local.ModelRunner (wrapped in a LocalBackend), so the real
engine and memory run around it; only the text is scripted, streamed in chunks like the
real model's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from bot.engine import Engine
from bot.inference.backend import Prompt
from bot.inference.local import LocalBackend
from bot.inference.prompt import PromptFormat
from bot.messages import Turn


class ScriptedModel:
    def __init__(
        self,
        reply: str | Callable[[str], str] = "Scripted reply.",
        *,
        chunk: int = 16,
        delay: float = 0.0,
        fail_on: str | None = None,
    ) -> None:
        self.reply = reply
        self.chunk = chunk
        self.delay = delay
        self.fail_on = fail_on
        self.histories: list[list[Turn]] = []
        self.inputs: list[str] = []
        self.system_prompts: list[str | None] = []
        self.speakers: list[str | None] = []
        # Each prompt's chat messages as a model without a `name` field sees them.
        self.prompts: list[list[dict[str, str]]] = []
        self.temperatures: list[float | None] = []  # each reply's own (Regenerate's)

    def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        self.histories.append(list(history))
        self.inputs.append(user_text)
        self.system_prompts.append(system_prompt)
        self.speakers.append(speaker)
        fmt = PromptFormat(False, system_prompt or "")
        self.prompts.append(fmt.messages(history, user_text, speaker))
        return Prompt([], user_text, len(history), False, len(user_text))

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        sinks: Sequence[Callable[[str], None]],
        stops: Sequence[threading.Event],
    ) -> list[str]:
        """One row after another: the script is about adapters, not batching."""
        return [self.generate(*row) for row in zip(prompts, sinks, stops, strict=True)]

    def generate(
        self, prompt: Prompt, on_text: Callable[[str], None], stop: threading.Event
    ) -> str:
        self.temperatures.append(prompt.temperature)
        if self.fail_on and self.fail_on in prompt.user_text:
            raise RuntimeError("scripted failure")
        text = self.reply(prompt.user_text) if callable(self.reply) else self.reply
        for start in range(0, len(text), self.chunk):
            if stop.is_set():
                break
            on_text(text[start : start + self.chunk])
            if self.delay:
                time.sleep(self.delay)
        return text


def batch_sizes(engine: Engine) -> list[int]:
    """The sizes of the batches the engine's local backend ran."""
    assert isinstance(engine.backend, LocalBackend)
    return engine.backend.batcher.batch_sizes
