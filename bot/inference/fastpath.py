"""A lean forward pass for the step scheduler, for Llama-family decoders.

transformers' forward of a step goes through ~8,300 ATen calls and many more Python
frames for SmolLM2-135M (hooks, keyword plumbing, a view and a transpose around every
projection, three products where one would do). `FastForward` runs the same model
from the same weights with the same arithmetic, in fewer and larger calls:

- the query/key/value projections and the gate/up projections are each one product
  over their weights laid end to end (the modules' own weights become views into the
  joined tensors, so no weight is held twice);
- RMSNorm is `F.rms_norm` (computed in fp32, as the model's own RMSNorm does);
- rotary embedding is applied to queries and keys in one go;
- attention goes through the scheduler's `RaggedStep`, as before.

On the bundled model the logits are bit-for-bit those of the model's own forward in
fp32 and bf16 (tests/test_fastpath.py), so greedy replies are unchanged.

In bf16 on a CPU whose oneDNN has bf16, every product's weight is also laid out once
in oneDNN's blocked format (`_pack`), the same bits as `F.linear` in ~0.7x the time.
`torch.compile` (inductor) of each layer's two halves was measured and not kept: ~86 s
to compile on 2 cores, other low bits, and 1.16x / 1.04x *slower* steps at 1 / 16 rows.

With `DTYPE=int8` (opt-in, lossy) the decoder's products use int8 weights, one scale per
output channel, and bf16 activations (`torch._weight_int8pack_mm`): half the weight
bytes of bf16, and a one-row kernel faster than oneDNN's on the machines measured
(README, Performance). The output head stays bf16. Each row's result does not depend on
how many rows share the product, so batch invariance holds as in bf16.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bot.inference.kvcache import RaggedStep

log = logging.getLogger(__name__)

# Decoders whose layers are exactly: RMSNorm, q/k/v/o attention with rotary
# embedding, RMSNorm, gated SiLU MLP, residuals around both (no per-head norms,
# no logit scaling or softcapping; sliding windows are refused by kvcache.install).
_FAMILIES = {"llama", "mistral", "qwen2"}


class Unsupported(ValueError):
    """The model is not one the lean forward reproduces exactly."""


def _check(model: Any, int8: bool = False) -> None:
    if int8:
        if model.device.type != "cpu" or model.dtype != torch.bfloat16:
            raise Unsupported("int8 weights run on a CPU, with the model loaded in bf16")
        if not hasattr(torch, "_weight_int8pack_mm"):
            raise Unsupported("this torch has no int8 weight kernel")
    config = model.config.get_text_config()
    if getattr(config, "model_type", None) not in _FAMILIES:
        raise Unsupported(f"model type {getattr(config, 'model_type', None)!r}")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        raise Unsupported("pretraining_tp")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {config.hidden_act}")
    base: Any = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            raise Unsupported(f"no model.{name}")
    if not hasattr(model, "lm_head"):
        raise Unsupported("no lm_head")
    for layer in base.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for part, names in (
            (attention, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj")),
            (layer, ("input_layernorm", "post_attention_layernorm")),
        ):
            for name in names:
                if not hasattr(part, name):
                    raise Unsupported(f"no {name}")
        for name in ("q_norm", "k_norm", "pre_feedforward_layernorm"):
            if hasattr(attention, name) or hasattr(layer, name):
                raise Unsupported(name)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"):
                raise Unsupported(type(norm).__name__)
    if int8:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        # The kernel reads its inputs in blocks of 16: other input widths give wrong
        # results or crash torch 2.13.
        widths = (config.hidden_size, config.intermediate_size, heads * head_dim)
        if any(width % 16 for width in widths):
            raise Unsupported(f"int8 weights need layer widths in multiples of 16, not {widths}")


# Rows a packed weight is laid out for (any count works; this one gave the same bits
# as F.linear at every count tried, 1 to 100).
_PACK_ROWS = 16


def _can_pack(model: Any) -> bool:
    return bool(
        model.dtype == torch.bfloat16
        and model.device.type == "cpu"
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)
    return packed


@dataclass(frozen=True)
class Int8Weight:
    """A weight quantized per output channel: `values` int8 [out, in], `scales` [out]
    in the activations' dtype; the weight is about `values * scales[:, None]`."""

    values: torch.Tensor
    scales: torch.Tensor


def quantize(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-channel int8: each output row scaled so its largest weight is 127
    (rounded with the scale as the kernel will use it, in the weight's dtype)."""
    rows = weight.detach().float()
    scales = (rows.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scales = scales.to(weight.dtype)
    values = torch.round(rows / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(values.contiguous(), scales)


def _int8(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """A product with an int8 weight (`quantize`), bf16 in and out."""
    result: torch.Tensor = torch._weight_int8pack_mm(x, weight.values, weight.scales)
    return result if bias is None else result + bias


def _join(linears: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights (and biases) end to end along the output dimension; each
    module's own parameter becomes a view into the joined tensor (no second copy)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [
                b.detach() if b is not None else weight.new_zeros(linear.weight.shape[0])
                for b, linear in zip(biases, linears, strict=True)
            ]
        )
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        if linear.bias is not None and bias is not None:
            linear.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm, bit for bit: in fp32, scaled in the input's dtype."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on [tokens, heads, dim]: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


class _Layer:
    """One decoder layer's weights, joined."""

    def __init__(self, layer: Any, heads: int, kv_heads: int, head_dim: int) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        # Tensors, packed or not, or `Int8Weight`s (DTYPE=int8).
        self.qkv: Any
        self.gate_up: Any
        self.o: Any
        self.down: Any
        self.qkv, self.qkv_bias = _join([attention.q_proj, attention.k_proj, attention.v_proj])
        self.gate_up, self.gate_up_bias = _join([mlp.gate_proj, mlp.up_proj])
        self.o, self.o_bias = attention.o_proj.weight, attention.o_proj.bias
        self.down, self.down_bias = mlp.down_proj.weight, mlp.down_proj.bias
        self.norm1 = layer.input_layernorm.weight
        self.eps1 = float(layer.input_layernorm.variance_epsilon)
        self.norm2 = layer.post_attention_layernorm.weight
        self.eps2 = float(layer.post_attention_layernorm.variance_epsilon)
        self.index = int(attention.layer_idx)
        self.scaling = float(attention.scaling)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.intermediate = mlp.gate_proj.weight.shape[0]


def _plain(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A product with a weight in oneDNN's blocked layout (`_pack`)."""
    result: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return result


# A product with a layer's weight: a tensor, packed or not, or an `Int8Weight`.
Linear = Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]


def _before_attention(
    linear: Linear,
    hidden: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys (rotated) and values, each [tokens, heads, dim]."""
    projected = linear(_rms(hidden, norm, eps), qkv, qkv_bias)
    tokens = hidden.shape[0]
    qk = projected[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    qk = _rotate(qk, cos, sin)
    value = projected[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    return qk[:, :heads], qk[:, heads:], value


def _after_attention(
    linear: Linear,
    hidden: torch.Tensor,
    attended: torch.Tensor,
    o: torch.Tensor,
    o_bias: torch.Tensor | None,
    norm: torch.Tensor,
    eps: float,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down: torch.Tensor,
    down_bias: torch.Tensor | None,
    intermediate: int,
) -> torch.Tensor:
    """The attention's output projection, residual, RMSNorm, gated MLP, residual."""
    hidden = hidden + linear(attended, o, o_bias)
    both = linear(_rms(hidden, norm, eps), gate_up, gate_up_bias)
    gated = F.silu(both[:, :intermediate]) * both[:, intermediate:]
    return hidden + linear(gated, down, down_bias)


class FastForward:
    """The model's logits for a `RaggedStep`, in fewer calls than its own forward."""

    def __init__(self, model: Any, int8: bool = False) -> None:
        _check(model, int8)
        config = model.config.get_text_config()
        base = model.model
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.model = model
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.layers = [_Layer(layer, heads, kv_heads, head_dim) for layer in base.layers]
        self.norm = base.norm.weight
        self.eps = float(base.norm.variance_epsilon)
        self.head, self.head_bias = model.lm_head.weight, model.lm_head.bias
        self.linear: Linear = _plain
        self.head_linear: Linear = _plain
        self.int8 = int8
        self.int8_bytes = 0  # the int8 weights' size (DTYPE=int8)
        if int8:
            self._quantize()
            self.packed = False
        else:
            self.packed = _can_pack(model) and self._pack()

    def _quantize(self) -> None:
        """DTYPE=int8: the decoder's products with int8 weights; the output head, the
        widest product and the one a lossy weight would change most, stays bf16
        (packed where oneDNN can). The bf16 weights stay for the model's own forward."""
        for layer in self.layers:
            layer.qkv, layer.o, layer.gate_up, layer.down = (
                quantize(w) for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
            )
        self.linear = _int8
        self.int8_bytes = sum(
            w.values.numel() + w.scales.numel() * w.scales.element_size()
            for layer in self.layers
            for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )
        if _can_pack(self.model):
            with contextlib.suppress(RuntimeError):  # this oneDNN cannot: plain stays
                self.head, self.head_linear = _pack(self.head), _packed

    def _pack(self) -> bool:
        """bf16 on a CPU: every product's weight in oneDNN's blocked layout, made once
        (a second copy of the weights, ~270 MB for SmolLM2-135M), instead of at every
        product: 0.65-0.72x the products' time at 1, 16 and 64 rows on the AMX Xeon,
        and the same bits as `F.linear` (packed for 16 rows; checked at 1-100 rows)."""
        try:
            packed = [
                [_pack(w) for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
                for layer in self.layers
            ]
            head = _pack(self.head)
        except RuntimeError as exc:  # this oneDNN cannot: the plain products stay
            log.info("bf16 weights stay unpacked (%s)", exc)
            return False
        for layer, (qkv, o, gate_up, down) in zip(self.layers, packed, strict=True):
            layer.qkv, layer.o, layer.gate_up, layer.down = qkv, o, gate_up, down
        self.head = head
        self.linear = self.head_linear = _packed
        return True

    def __call__(self, ids: torch.Tensor, step: RaggedStep, keep: torch.Tensor) -> torch.Tensor:
        """Logits [len(keep), vocab] of the tokens at `keep` of the flat `ids` [tokens]."""
        hidden = self.embed(ids)  # [tokens, hidden]
        cos, sin = self.rotary(hidden, step.position_ids)  # [1, tokens, dim]
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [tokens, 1, dim]
        for layer in self.layers:
            query, key, value = _before_attention(
                self.linear,
                hidden,
                layer.norm1,
                layer.eps1,
                layer.qkv,
                layer.qkv_bias,
                cos,
                sin,
                layer.heads,
                layer.kv_heads,
                layer.head_dim,
            )
            # RaggedStep.attend takes transformers' [1, heads, tokens, dim].
            attended = step.attend(
                layer.index,
                query.transpose(0, 1).unsqueeze(0),
                key.transpose(0, 1).unsqueeze(0),
                value.transpose(0, 1).unsqueeze(0),
                layer.scaling,
            )
            hidden = _after_attention(
                self.linear,
                hidden,
                # Contiguous, as the model's attention hands it to o_proj.
                attended.reshape(hidden.shape[0], -1).contiguous(),
                layer.o,
                layer.o_bias,
                layer.norm2,
                layer.eps2,
                layer.gate_up,
                layer.gate_up_bias,
                layer.down,
                layer.down_bias,
                layer.intermediate,
            )
        picked = _rms(hidden[keep], self.norm, self.eps)
        return self.head_linear(picked, self.head, self.head_bias)


def fast_forward(model: Any, int8: bool = False) -> FastForward | None:
    """The lean forward for `model` (one per model and mode: its weights are joined and
    quantized once), or None (with the reason logged) when its architecture is not one
    it reproduces."""
    attribute = "_chatbot_fast_forward_int8" if int8 else "_chatbot_fast_forward"
    known = getattr(model, attribute, None)
    if isinstance(known, FastForward):
        return known
    try:
        fast = FastForward(model, int8)
    except Unsupported as exc:
        log.info("The lean decoding path is off for this model (%s)", exc)
        return None
    setattr(model, attribute, fast)
    return fast


def unsupported(model: Any, int8: bool = False) -> str | None:
    """Why the lean forward cannot run `model` (None: it can), checked before loading
    anything into it: DTYPE=int8 is refused at start-up rather than quietly run in bf16."""
    try:
        _check(model, int8)
    except Unsupported as exc:
        return str(exc)
    return None
