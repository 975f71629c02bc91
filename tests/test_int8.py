"""DTYPE=int8 (opt-in, lossy): the decoder's products with int8 weights, one scale per
output channel, bf16 activations (bot.inference.fastpath). Close to bf16, never
exactly it; batch invariant like bf16; refused at start-up where it cannot run."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bot.engine import Engine
from bot.inference.fastpath import Int8Weight, fast_forward, quantize, unsupported
from bot.inference.generation import GenerationOptions, Generator
from bot.inference.kvcache import ModelShape, RaggedStep, SlotPool, install
from bot.inference.loader import LoadedModel, load_model
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, Message
from bot.settings import ConfigError
from bot.store.memory import InProcessMemory
from tests.conftest import bot_env, greedy, make_settings, run_bot


def test_quantized_products_are_close_to_bf16() -> None:
    torch.manual_seed(0)
    weight = (torch.randn(960, 576) * 0.02).bfloat16()
    x = torch.randn(5, 576).bfloat16()
    quantized = quantize(weight)
    assert quantized.values.dtype == torch.int8 and quantized.scales.dtype == torch.bfloat16
    exact = x.float() @ weight.float().T
    got = torch._weight_int8pack_mm(x, quantized.values, quantized.scales).float()
    error = (got - exact).norm() / exact.norm()
    assert 0 < error < 0.02, error  # lossy, but by well under 2 %
    # Every row's largest weight is 127 steps of its scale.
    assert quantized.values.abs().amax(dim=1).eq(127).all()


def test_a_rows_product_does_not_depend_on_the_others() -> None:
    """The kernel's result for a row is the same bits whatever rows share the product."""
    torch.manual_seed(1)
    quantized = quantize((torch.randn(3072, 576) * 0.02).bfloat16())
    x = torch.randn(40, 576).bfloat16()
    together = torch._weight_int8pack_mm(x, quantized.values, quantized.scales)
    for rows in (1, 2, 3, 7, 16, 17, 33):
        alone = torch._weight_int8pack_mm(x[rows - 1 : rows], quantized.values, quantized.scales)
        assert torch.equal(alone[0], together[rows - 1]), rows


def _tiny(config_class: Any, model_class: Any, **extra: Any) -> Any:
    config = config_class(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, **extra
    )
    return model_class(config).to(torch.bfloat16).eval()


def test_a_tiny_llama_in_int8_is_close_to_its_bf16_forward() -> None:
    torch.manual_seed(2)
    model = _tiny(LlamaConfig, LlamaForCausalLM, num_attention_heads=4, num_key_value_heads=2)
    assert unsupported(model, int8=True) is None
    fast = fast_forward(model, int8=True)
    assert fast is not None and fast.int8
    assert all(isinstance(layer.qkv, Int8Weight) for layer in fast.layers)
    assert fast_forward(model) is not fast  # the exact bf16 forward stays its own
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        expected = model(ids).logits[0, -1].float()
    install(model)
    pool = SlotPool(ModelShape.of(model), 1, 32)
    with torch.inference_mode():
        got = fast(ids[0], RaggedStep(pool, [(0, 0, 12)]), torch.tensor([11]))[0].float()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=0)
    assert cosine > 0.99, cosine
    assert not torch.equal(got, expected)  # other weights: lossy, as the README says


def test_int8_is_refused_where_it_cannot_run() -> None:
    gpt2 = GPT2LMHeadModel(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    )
    assert unsupported(gpt2.bfloat16(), int8=True) is not None
    odd = _tiny(LlamaConfig, LlamaForCausalLM, num_attention_heads=4, head_dim=10)
    assert "multiples of 16" in str(unsupported(odd, int8=True))
    fp32 = _tiny(LlamaConfig, LlamaForCausalLM, num_attention_heads=4).float()
    assert "bf16" in str(unsupported(fp32, int8=True))


@pytest.fixture(scope="module")
def int8(model_cache_dir: Any) -> LoadedModel:
    return load_model(make_settings(model_cache_dir=model_cache_dir, dtype="int8"))


def msg(text: str, channel: str) -> Message:
    return Message(ConversationKey("test", channel), "u1", "User", text, is_direct=True)


@pytest.mark.model
def test_the_bundled_model_loads_in_bf16_for_int8(
    int8: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    assert int8.model.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"DTYPE: int8.*FAST_DECODE=false"):
        Generator(int8, GenerationOptions(24, 0.0, 1.0, 1.0), "", fast_decode=False, int8=True)
    caplog.set_level(logging.INFO)
    Generator.from_settings(int8, make_settings(dtype="int8"))  # quantized at start
    assert any("int8 weights ready" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ({"FAST_DECODE": "false"}, "DTYPE: int8 needs FAST_DECODE=true"),
        (
            {"MODEL_BACKEND": "openai", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
            "DTYPE: int8 is for the local model",
        ),
    ],
)
def test_int8_settings_that_cannot_work_stop_before_any_model_loads(
    values: dict[str, str], said: str
) -> None:
    result = run_bot("console", env=bot_env(DTYPE="int8", **values))
    assert result.returncode == 2
    assert said in result.stderr and "Traceback" not in result.stderr


@pytest.mark.model
async def test_the_bundled_model_in_int8_answers_and_is_batch_invariant(
    int8: LoadedModel,
) -> None:
    """Greedy, 48 tokens: the reply alone and beside 3 others (every step shared) is the
    same, and still knows what bf16 knows."""
    question = "What is the capital of France?"

    async def reply_with(count: int) -> str:
        generator = greedy(int8, max_new_tokens=48, batch_size=8, dtype="int8")
        engine = Engine(LocalBackend(generator), InProcessMemory(20, 600))
        try:
            texts = [f"Tell me about animal number {i}." for i in range(count)]
            replies = await asyncio.gather(
                engine.reply(msg(question, "mine")),
                *(engine.reply(msg(text, f"o{i}")) for i, text in enumerate(texts)),
            )
            scheduler = generator.scheduler
            assert scheduler is not None
            assert getattr(scheduler.forward, "int8", False)  # int8 products ran
            return replies[0].text
        finally:
            await engine.close()

    alone = await reply_with(0)
    assert "Paris" in alone
    assert await reply_with(3) == alone
