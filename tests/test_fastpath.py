"""The lean forward (bot.inference.fastpath) against the model's own forward: on the
same ragged steps (prompt chunks and decoding rows together) the logits and the
keys/values written are bit for bit the same, in fp32 and in the machine's dtype."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from bot.inference.fastpath import FastForward, fast_forward
from bot.inference.kvcache import ModelShape, RaggedStep, SlotPool, install
from bot.inference.loader import LoadedModel, load_model
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def fp32(model_cache_dir: Any) -> LoadedModel:
    return load_model(make_settings(model_cache_dir=model_cache_dir, dtype="fp32"))


def own_forward(model: Any, ids: list[int], step: RaggedStep, keep: torch.Tensor) -> torch.Tensor:
    """The step as the scheduler runs it without the lean forward."""
    out = model(
        input_ids=torch.tensor([ids]),
        position_ids=step.position_ids,
        attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool),
        use_cache=False,
        logits_to_keep=keep,
        ragged=step,
    )
    logits: torch.Tensor = out.logits[0]
    return logits


def compare(model: Any, fast: FastForward, vocab: int) -> None:
    """Three rows read prompts of different lengths in one step, then decode while a
    fourth reads its prompt, then all four decode: both ways, step by step."""
    torch.manual_seed(1)
    shape = ModelShape.of(model)
    pools = [SlotPool(shape, 4, 256), SlotPool(shape, 4, 256)]
    prompts = [torch.randint(5, vocab, (n,)).tolist() for n in (7, 19, 3, 30)]
    filled = [0, 0, 0, 0]
    plans = [
        [(0, 7), (1, 19), (2, 3)],
        [(0, 1), (1, 1), (2, 1), (3, 30)],
        [(0, 1), (1, 1), (2, 1), (3, 1)],
        [(0, 1), (2, 1), (3, 1)],
    ]
    for plan in plans:
        ids: list[int] = []
        spans, keep = [], []
        for row, count in plan:
            tokens = prompts[row]
            ids += tokens[filled[row] : filled[row] + count]
            spans.append((row, filled[row], count))
            keep.append(len(ids) - 1)
        kept = torch.tensor(keep)
        with torch.inference_mode():
            expected = own_forward(model, ids, RaggedStep(pools[0], spans), kept)
            got = fast(torch.tensor(ids), RaggedStep(pools[1], spans), kept)
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected), (got - expected).abs().max()
        for row, count in plan:
            end = filled[row] + count
            for pool in pools:
                pool.written(row, end)
            assert torch.equal(pools[0].keys[:, row, :, :end], pools[1].keys[:, row, :, :end])
            assert torch.equal(pools[0].values[:, row, :, :end], pools[1].values[:, row, :, :end])
            filled[row] = end
            # The next token: the row's greedy choice (the same both ways, as asserted).
            prompts[row] = [*prompts[row][:end], int(expected[plan.index((row, count))].argmax())]


@pytest.mark.model
def test_bundled_model_fp32_bit_for_bit(fp32: LoadedModel) -> None:
    assert install(fp32.model) is None
    fast = fast_forward(fp32.model)
    assert fast is not None
    assert fast_forward(fp32.model) is fast  # joined once per model
    compare(fp32.model, fast, fp32.model.config.vocab_size)


@pytest.mark.model
def test_bundled_model_in_its_dtype_bit_for_bit(bundled: LoadedModel) -> None:
    assert install(bundled.model) is None
    fast = fast_forward(bundled.model)
    assert fast is not None
    compare(bundled.model, fast, bundled.model.config.vocab_size)


def tiny_llama(**extra: Any) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **extra,
    )
    model = LlamaForCausalLM(config).eval()  # type: ignore[no-untyped-call]
    assert install(model) is None
    return model


def test_weights_are_joined_not_copied() -> None:
    model = tiny_llama(attention_bias=True, mlp_bias=True)
    fast = fast_forward(model)
    assert fast is not None
    attention = model.model.layers[0].self_attn
    joined = fast.layers[0].qkv
    assert attention.q_proj.weight.data_ptr() == joined.data_ptr()
    assert attention.k_proj.weight.untyped_storage().data_ptr() == joined.data_ptr()
    compare(model, fast, 300)  # with every projection's bias too


@pytest.mark.parametrize(
    ("config_class", "model_class"),
    [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)],
)
def test_the_other_families_bit_for_bit(config_class: Any, model_class: Any) -> None:
    torch.manual_seed(0)
    config = config_class(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=None,
    )
    model = model_class(config).eval()
    assert install(model) is None
    fast = fast_forward(model)
    assert fast is not None
    compare(model, fast, 300)


def test_bf16_weights_packed_bit_for_bit() -> None:
    """In bf16 (where oneDNN has it) the products use packed weights: the same bits."""
    model = tiny_llama().to(torch.bfloat16)
    fast = fast_forward(model)
    assert fast is not None
    compare(model, fast, 300)


def test_other_architectures_keep_their_own_forward() -> None:
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    assert fast_forward(GPT2LMHeadModel(config)) is None
