"""Model loading: the bundled model's cache, and a seq2seq model from a local directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration

from bot.engine import Engine
from bot.inference.loader import BUNDLED_NAME, LoadedModel, cpu_dtype, load_model
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message, Turn
from bot.store.memory import InProcessMemory
from tests.conftest import greedy, make_settings

pytestmark = pytest.mark.model


def test_bundled_model_loads_from_its_cache(
    bundled: LoadedModel, model_cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.inference.loader")
    cache = next(model_cache_dir.iterdir())
    assert (cache / "model.safetensors").is_file() and (cache / "source.json").is_file()
    again = load_model(make_settings(model_cache_dir=model_cache_dir))
    assert not any("First start" in r.getMessage() for r in caplog.records)
    assert again.name == BUNDLED_NAME and not again.is_encoder_decoder
    assert again.context_window == 8192
    # DTYPE=auto: the machine's choice, and the start-up line says why.
    chosen, why = cpu_dtype()
    assert next(again.model.parameters()).dtype == chosen
    assert any(why in r.getMessage() for r in caplog.records)
    assert chosen == (torch.bfloat16 if "with AMX" in why else torch.float32)
    mine, theirs = again.model.state_dict(), bundled.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_a_missing_model_is_a_clear_config_error(tmp_path: Path) -> None:
    from bot.settings import ConfigError

    with pytest.raises(ConfigError, match=r"Cannot load MODEL="):
        load_model(make_settings(model=str(tmp_path / "no-such-model")))


@pytest.fixture(scope="module")
def tiny_seq2seq(bundled: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BlenderBot with random weights and a local tokenizer, saved like a hub model.

    The directory's name says "gpt": the kind must come from the config, not the name.
    """
    path = tmp_path_factory.mktemp("tiny") / "gpt-looking-name"
    tokenizer: Any = bundled.tokenizer
    saved_template = tokenizer.chat_template
    tokenizer.chat_template = None  # BlenderBot tokenizers may carry none
    try:
        tokenizer.save_pretrained(path)
    finally:
        tokenizer.chat_template = saved_template
    config = BlenderbotConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    BlenderbotForConditionalGeneration(config).save_pretrained(path)
    return path


class PromptSpy:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.prompts: list[str] = []

    def prepare(
        self,
        history: list[Turn],
        user_text: str,
        system_prompt: str | None = None,
        speaker: str | None = None,
    ) -> Any:
        return self.inner.prepare(history, user_text, system_prompt, speaker)

    def generate_batch(self, prompts: Any, sinks: Any, stops: Any) -> list[str]:
        for prompt in prompts:
            self.prompts.append(self.inner.loaded.tokenizer.decode(prompt.input_ids))
        return list(self.inner.generate_batch(prompts, sinks, stops))


async def test_seq2seq_model_through_the_same_loading_code(tiny_seq2seq: Path) -> None:
    loaded = load_model(make_settings(model=str(tiny_seq2seq), dtype="fp32"))
    assert loaded.is_encoder_decoder and loaded.context_window == 64
    assert greedy(loaded, max_new_tokens=500).options.max_new_tokens == 63  # decoder's window
    generator = greedy(loaded, max_new_tokens=6, system_prompt="SYSTEM-PROMPT-TEXT")
    spy = PromptSpy(generator)
    engine = Engine(LocalBackend(spy), InProcessMemory(20, 3600))
    key = ConversationKey("test", "s2s")
    first = await engine.reply(Message(key, "u", "U", "Hello there.", is_direct=True))
    second = await engine.reply(Message(key, "u", "U", "How are you?", is_direct=True))
    assert first.ok and second.ok
    # Turns only, BlenderBot's way: no system prompt, user turns after a space.
    assert "SYSTEM-PROMPT-TEXT" not in spy.prompts[1]
    assert spy.prompts[1].startswith(" Hello there.  ")
    assert spy.prompts[1].endswith("   How are you?<|im_end|>")
    # A long history is fitted into the encoder's 64 positions.
    for i in range(6):
        await engine.reply(
            Message(key, "u", "U", f"Here is a longer message number {i}.", is_direct=True)
        )
    last = spy.prompts[-1]
    assert len(loaded.tokenizer.encode(last, add_special_tokens=False)) <= 64
    assert "number 5" in last and "Hello there." not in last
    await engine.close()
