"""Running the model: prompt fitting and `generate` with streamed text.

Every method here blocks (tokenizing, inference) and is meant to run on the
engine's worker threads, never on the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from bot.messages import Turn
from bot.model import LoadedModel
from bot.prompt import Prompt, PromptFormat, build_prompt
from bot.settings import Settings


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    temperature: float  # 0 means greedy
    top_p: float
    repetition_penalty: float

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationOptions:
        return cls(
            settings.max_new_tokens,
            settings.temperature,
            settings.top_p,
            settings.repetition_penalty,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "num_beams": 1,  # streaming needs one beam; some configs (BlenderBot) ask for 10
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


class _CallbackStreamer(TextStreamer):
    """transformers' word-safe incremental decoding, handing text to a callback."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


class _StopWhenSet(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> Any:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool)


class Generator:
    """A loaded model with its prompt format, budget and generation settings."""

    def __init__(
        self,
        loaded: LoadedModel,
        options: GenerationOptions,
        system_prompt: str,
        context_tokens: int | None = None,
    ) -> None:
        self.loaded = loaded
        self.format = PromptFormat(loaded.is_encoder_decoder, system_prompt)
        window = min(loaded.context_window, context_tokens or loaded.context_window)
        if loaded.is_encoder_decoder:
            # The encoder reads the prompt, the decoder writes the reply: separate windows.
            self.prompt_budget = window
            max_new = min(options.max_new_tokens, window - 1)
        else:
            # Keep at least half the window for the prompt if max_new_tokens is very large.
            max_new = min(options.max_new_tokens, window // 2)
            self.prompt_budget = window - max_new
        self.options = GenerationOptions(
            max_new, options.temperature, options.top_p, options.repetition_penalty
        )
        # Fast tokenizers are not safe to call from several threads at once.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def from_settings(cls, loaded: LoadedModel, settings: Settings) -> Generator:
        return cls(
            loaded,
            GenerationOptions.from_settings(settings),
            settings.system_prompt,
            settings.context_tokens,
        )

    def prepare(self, history: Sequence[Turn], user_text: str) -> Prompt:
        with self._tokenizer_lock:
            return build_prompt(
                self.loaded.tokenizer, self.format, history, user_text, self.prompt_budget
            )

    def generate(
        self,
        prompt: Prompt,
        on_text: Callable[[str], None] = lambda _text: None,
        stop: threading.Event | None = None,
    ) -> str:
        """Generate a reply to `prompt`, passing text to `on_text` as it is decoded."""
        tokenizer = self.loaded.tokenizer
        input_ids = torch.tensor([prompt.input_ids], device=self.loaded.device)
        parts: list[str] = []

        def collect(text: str) -> None:
            parts.append(text)
            on_text(text)

        with self._tokenizer_lock:
            streamer = _CallbackStreamer(tokenizer, collect)
        criteria = StoppingCriteriaList([_StopWhenSet(stop or threading.Event())])
        with torch.inference_mode():
            self.loaded.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
                stopping_criteria=criteria,
                **self.options.generate_kwargs(),
            )
        return "".join(parts)
