"""Running the model: prompt fitting and `generate` with streamed text.

Every method here blocks (tokenizing, inference) and is meant to run on the
engine's worker threads, never on the event loop.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bot import metrics
from bot.inference.backend import Prompt
from bot.inference.detokenize import TextStream
from bot.inference.fastpath import fast_forward
from bot.inference.fastpath import unsupported as fastpath_unsupported
from bot.inference.kvcache import install, opening
from bot.inference.loader import LoadedModel
from bot.inference.prompt import PromptFormat, build_prompt, encode, renders_names
from bot.inference.scheduler import Scheduler
from bot.messages import Turn
from bot.settings import ConfigError, Settings

log = logging.getLogger(__name__)

# The default prompt + reply budget on a CPU (CONTEXT_TOKENS overrides it).
CPU_CONTEXT_TOKENS = 2048
GPU_CONTEXT_TOKENS = 8192


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int
    temperature: float  # 0 means greedy
    top_p: float
    repetition_penalty: float
    seed: int | None = None  # sampling in the step scheduler: SEED

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationOptions:
        return cls(
            settings.max_new_tokens,
            settings.temperature,
            settings.top_p,
            settings.repetition_penalty,
            settings.seed,
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


class _BatchStreamer(BaseStreamer):
    """`generate`'s streamer for a batch: each row's tokens to that row's TextStream."""

    def __init__(self, tokenizer: Any, sinks: Sequence[Callable[[str], None]], eos: set[int]):
        self._rows = [TextStream(tokenizer, sink) for sink in sinks]
        self._eos = eos
        self._done = [False] * len(sinks)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the prompt (or a seq2seq decoder's start token)
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self._rows), -1)[:, -1].tolist()):
            if self._done[row]:
                continue
            if token in self._eos:
                self._done[row] = True
                self._rows[row].close()
                continue
            self._rows[row].add(token)

    def end(self) -> None:
        for row in self._rows:
            row.close()

    def token_count(self) -> int:
        return sum(len(row.tokens) for row in self._rows)

    def text(self, row: int) -> str:
        return self._rows[row].text()


class _StopWhenSet(StoppingCriteria):
    """Stops each row whose event is set (its reader went away)."""

    def __init__(self, events: Sequence[threading.Event]) -> None:
        self._events = events

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> Any:
        flags = [event.is_set() for event in self._events]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class Generator:
    """A loaded model with its prompt format, budget and generation settings."""

    def __init__(
        self,
        loaded: LoadedModel,
        options: GenerationOptions,
        system_prompt: str,
        context_tokens: int | None = None,
        *,
        max_rows: int = 16,
        chunk_tokens: int = 64,
        cache_bytes: int = 1 << 30,
        cache_idle_seconds: float | None = None,
        memory_turns: int = 20,
        fast_decode: bool = True,
        int8: bool = False,
    ) -> None:
        self.loaded = loaded
        self.fast_decode = fast_decode
        self.int8 = int8
        self.cache_idle_seconds = cache_idle_seconds
        self.memory_turns = memory_turns
        self.format = PromptFormat(
            loaded.is_encoder_decoder,
            system_prompt,
            renders_names(loaded.tokenizer, loaded.is_encoder_decoder),
        )
        window, self.prompt_budget, max_new = budget(loaded, options, context_tokens)
        self.options = GenerationOptions(
            max_new, options.temperature, options.top_p, options.repetition_penalty, options.seed
        )
        # Fast tokenizers are not safe to call from several threads at once.
        self._tokenizer_lock = threading.Lock()
        self._openings: dict[str, list[int]] = {}  # by system prompt
        # Decoder-only models run in the step scheduler; encoder-decoder models
        # (BlenderBot) in batched `generate` (bot.inference.batching).
        # The worker threads decode with their own copy of the tokenizer: encoding
        # (on the prepare thread) switches a setting of the Rust tokenizer, which must
        # not happen while another thread uses the same one.
        self._decoder = copy.deepcopy(loaded.tokenizer)
        self.scheduler: Scheduler | None = None
        unsupported = None if loaded.is_encoder_decoder else install(loaded.model)
        if unsupported:
            log.info("Continuous batching is off for this model (%s)", unsupported)
        if int8:
            # Refused at start-up, not quietly run in bf16: int8 weights exist only in
            # the lean forward of the step scheduler.
            why = unsupported or fastpath_unsupported(loaded.model, int8=True)
            if loaded.is_encoder_decoder or not fast_decode or why:
                reason = why or ("FAST_DECODE=false" if not fast_decode else "encoder-decoder")
                raise ConfigError(
                    "Invalid configuration: DTYPE: int8 needs a Llama-family decoder "
                    f"through the lean forward, on a CPU ({reason})"
                )
            # Quantized now (~1 s), not on the worker before the first step: a failure
            # stops the start instead of leaving the model quietly in bf16.
            began = time.perf_counter()
            try:
                built = fast_forward(loaded.model, int8=True)
            except (RuntimeError, MemoryError) as exc:
                raise ConfigError(f"DTYPE=int8: could not quantize the model ({exc})") from None
            if built is None:
                raise ConfigError("Invalid configuration: DTYPE: int8 is not possible here")
            log.info(
                "int8 weights ready in %.1f s (%d MB, beside the bf16 ones)",
                time.perf_counter() - began,
                built.int8_bytes >> 20,
            )
        if not loaded.is_encoder_decoder and not unsupported:
            self.scheduler = self._scheduler(
                window, max_new, options, max_rows, chunk_tokens, cache_bytes
            )

    def _scheduler(
        self,
        window: int,
        max_new: int,
        options: GenerationOptions,
        max_rows: int,
        chunk_tokens: int,
        cache_bytes: int,
    ) -> Scheduler:
        try:
            return Scheduler(
                self.loaded.model,
                self._decoder,
                max_new_tokens=max_new,
                capacity=window,
                eos=self._eos_ids(),
                temperature=options.temperature,
                top_p=options.top_p,
                repetition_penalty=options.repetition_penalty,
                max_rows=max_rows,
                step_tokens=chunk_tokens,
                cache_bytes=cache_bytes,
                cache_idle_seconds=self.cache_idle_seconds,
                seed=options.seed,
                # The same logits as the model's own forward, in fewer calls.
                fast=partial(fast_forward, self.loaded.model, self.int8)
                if self.fast_decode
                else None,
            )
        except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory errors
            raise ConfigError(
                f"The running replies' key/value slots ({max_rows} x {window} tokens) do "
                f"not fit on {self.loaded.device}: lower BATCH_SIZE or CONTEXT_TOKENS ({exc})"
            ) from None

    @classmethod
    def from_settings(cls, loaded: LoadedModel, settings: Settings) -> Generator:
        return cls(
            loaded,
            GenerationOptions.from_settings(settings),
            settings.system_prompt,
            settings.context_tokens,
            max_rows=settings.batch_size,
            chunk_tokens=settings.prefill_chunk_tokens,
            cache_bytes=settings.kv_cache_mb << 20,
            # A model cache holds people's words no longer than memory does.
            cache_idle_seconds=settings.memory_ttl_seconds,
            memory_turns=settings.memory_max_turns,
            fast_decode=settings.fast_decode,
            int8=settings.dtype == "int8",
        )

    def prepare(
        self,
        history: Sequence[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Prompt:
        fmt = self.format
        if system_prompt is not None:
            fmt = dataclasses.replace(fmt, system_prompt=system_prompt)
        with self._tokenizer_lock:
            prompt = build_prompt(
                self.loaded.tokenizer,
                fmt,
                history,
                user_text,
                self.prompt_budget,
                # A full memory drops its oldest exchange when this reply is stored.
                sliding=len(history) + 2 > self.memory_turns,
                speaker=speaker,
            )
            start = self._opening(fmt)
        shared = len(start) if prompt.input_ids[: len(start)] == start else 0
        return dataclasses.replace(prompt, shared=shared)

    def _opening(self, fmt: PromptFormat) -> list[int]:
        """The tokens every prompt with this system prompt starts with (the tokenizer
        lock held): what prompts for two different first messages agree on."""
        known = self._openings.get(fmt.system_prompt)
        if known is None:
            known = opening(lambda text: encode(self.loaded.tokenizer, fmt, fmt.messages([], text)))
            if len(self._openings) >= 64:  # personas: bounded
                self._openings.pop(next(iter(self._openings)))
            self._openings[fmt.system_prompt] = known
        return known

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is to this model (for usage limits)."""
        with self._tokenizer_lock:
            return len(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(
        self,
        prompt: Prompt,
        on_text: Callable[[str], None] = lambda _text: None,
        stop: threading.Event | None = None,
    ) -> str:
        """Generate a reply to `prompt`, passing text to `on_text` as it is decoded."""
        return self.generate_batch([prompt], [on_text], [stop or threading.Event()])[0]

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        sinks: Sequence[Callable[[str], None]],
        stops: Sequence[threading.Event],
    ) -> list[str]:
        """Generate replies to several prompts in one batch; each row streams to its sink.

        Causal models are padded on the left (the new tokens line up at the end), encoder
        inputs on the right; the attention mask hides the padding either way.
        """
        own = {p.temperature for p in prompts}
        if len(own) > 1:  # a Regenerate's own temperature: its own `generate` call
            texts = [""] * len(prompts)
            for temperature in own:
                rows = [i for i, p in enumerate(prompts) if p.temperature == temperature]
                done = self.generate_batch(
                    [prompts[i] for i in rows], [sinks[i] for i in rows], [stops[i] for i in rows]
                )
                for i, text in zip(rows, done, strict=True):
                    texts[i] = text
            return texts
        (temperature,) = own
        options = self.options
        if temperature is not None:
            options = dataclasses.replace(options, temperature=temperature)
        tokenizer = self.loaded.tokenizer
        pad = tokenizer.pad_token_id
        width = max(len(p.input_ids) for p in prompts)
        ids, mask = [], []
        for prompt in prompts:
            fill = [pad] * (width - len(prompt.input_ids))
            ones = [1] * len(prompt.input_ids)
            if self.loaded.is_encoder_decoder:
                ids.append(prompt.input_ids + fill)
                mask.append(ones + [0] * len(fill))
            else:
                ids.append(fill + prompt.input_ids)
                mask.append([0] * len(fill) + ones)
        device = self.loaded.device
        streamer = _BatchStreamer(self._decoder, sinks, self._eos_ids())
        with torch.inference_mode():
            self.loaded.model.generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                pad_token_id=pad,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopWhenSet(stops)]),
                **options.generate_kwargs(),
            )
        metrics.TOKENS.inc(streamer.token_count())
        return [streamer.text(row) for row in range(len(prompts))]

    def _eos_ids(self) -> set[int]:
        return eos_ids(self.loaded)


def budget(
    loaded: LoadedModel, options: GenerationOptions, context_tokens: int | None
) -> tuple[int, int, int]:
    """The window a reply works in, the prompt's share of it, and the new tokens'."""
    if context_tokens is None:
        # On a CPU a prompt is read at a few hundred tokens/s: the model's whole
        # window (8,192 for SmolLM2) would let one message cost minutes. On a GPU,
        # windows of 128k tokens would make the running replies' caches too big.
        cpu = loaded.device.type == "cpu"
        context_tokens = CPU_CONTEXT_TOKENS if cpu else GPU_CONTEXT_TOKENS
    window = min(loaded.context_window, context_tokens or loaded.context_window)
    if loaded.is_encoder_decoder:
        # The encoder reads the prompt, the decoder writes the reply: separate windows.
        return window, window, min(options.max_new_tokens, window - 1)
    # Keep at least half the window for the prompt if max_new_tokens is very large.
    max_new = min(options.max_new_tokens, window // 2)
    return window, window - max_new, max_new


def eos_ids(loaded: LoadedModel) -> set[int]:
    """Every token that ends a reply: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (loaded.model.generation_config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids
