"""Key/value caches for the step scheduler (bot/inference/scheduler.py).

- `SlotPool`: one preallocated key/value buffer per running row ("slot"), per layer.
  Rows of different lengths decode together without padding their prompts: each
  step's new tokens are laid end to end in one sequence for the model's linear
  layers, and attention reads each row's own slot (`RaggedStep.attend`).
- `PrefixStore`: what a conversation's finished turn leaves behind, its token ids and
  their keys/values, kept between turns within a byte budget (least recently used go
  first). A later prompt reuses the longest common token prefix, so a turn reads
  only its new tokens; when history was trimmed or deleted the prefix differs there,
  and nothing past the difference is reused. Reuse is decided on token ids alone:
  the same ids at the same positions give the same keys and values.

The attention function is registered with transformers' `AttentionInterface`, so
any decoder-only model that dispatches attention through it (Llama, Qwen2, Mistral,
SmolLM, …) runs unmodified; without a `ragged` argument it is plain SDPA, so
`model.generate` on the same model behaves exactly as before.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "chatbot_ragged"


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    step = kwargs.pop("ragged", None)
    if step is None:
        output, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )
        return output, weights
    return step.attend(int(module.layer_idx), query, key, value, kwargs.get("scaling")), None


_registered = threading.Lock()


def install(model: Any) -> str | None:
    """Route the model's attention through the ragged function (SDPA when unused).

    Returns why the model cannot run ragged steps (it is left as it was), or None.
    """
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return f"sliding-window attention ({window} tokens)"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            return f"{name} is not supported by the ragged attention"
    with _registered:
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, KeyError) as exc:
        return f"its attention cannot be replaced ({exc})"
    if getattr(config, "_attn_implementation", None) != ATTENTION:
        return "its attention does not dispatch through transformers' AttentionInterface"
    return None


@dataclass(frozen=True)
class ModelShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, model.dtype, model.device)


class SlotPool:
    """Keys and values of the running rows: `keys[layer][slot, head, position, dim]`.

    Allocated once with `torch.empty`: the operating system commits pages only as
    positions are written, so an idle slot's capacity costs address space, not memory.
    """

    def __init__(self, shape: ModelShape, slots: int, capacity: int) -> None:
        self.shape = shape
        self.capacity = capacity
        size = (shape.layers, slots, shape.kv_heads, capacity, shape.head_dim)
        self.keys = torch.empty(size, dtype=shape.dtype, device=shape.device)
        self.values = torch.empty(size, dtype=shape.dtype, device=shape.device)
        # Positions below _clean[slot] hold finite numbers (written once, or zeroed).
        # Batched attention reads every slot up to the longest row, masked; never
        # written memory there can hold denormals, which made fp32 steps 5x slower.
        self._clean = [0] * slots

    def written(self, slot: int, end: int) -> None:
        """Positions [0, end) of `slot` hold keys/values (rows fill slots from 0)."""
        self._clean[slot] = max(self._clean[slot], end)

    def occupy(self, slot: int, trusted: int) -> None:
        """A new row takes `slot`, whose first `trusted` positions it wrote or loaded.
        The rest is an earlier row's: possibly NaN or Inf (fp16/bf16), which a mask
        cannot hide (NaN times a zero weight is NaN), so it is zeroed before it is read."""
        self._clean[slot] = trusted

    def clean(self, slots: int, length: int) -> None:
        """Make positions [0, length) of slots [0, slots) safe to read, zeroing only
        what was never written."""
        for slot in range(slots):
            if self._clean[slot] < length:
                self.keys[:, slot, :, self._clean[slot] : length] = 0
                self.values[:, slot, :, self._clean[slot] : length] = 0
                self._clean[slot] = length

    def load(self, slot: int, cached: torch.Tensor, length: int) -> None:
        """Copy the first `length` positions of a stored prefix into `slot`."""
        self.keys[:, slot, :, :length] = cached[0, :, :, :length]
        self.values[:, slot, :, :length] = cached[1, :, :, :length]
        self.written(slot, length)

    def save(self, slot: int, length: int) -> torch.Tensor:
        """A compact copy of the slot's first `length` positions: [2, layers, heads, n, dim]."""
        # stack copies: the result shares no memory with the pool.
        return torch.stack((self.keys[:, slot, :, :length], self.values[:, slot, :, :length]))


class RaggedStep:
    """One forward pass over several rows' new tokens, laid end to end.

    `spans[i] = (slot, past, count)`: row i's `count` new tokens follow its `past`
    cached ones in `slot`. Rows with one new token (decoding) attend together in one
    batched call over the slots; rows reading a prompt chunk attend one by one.
    """

    def __init__(self, pool: SlotPool, spans: list[tuple[int, int, int]]) -> None:
        self.pool = pool
        device = pool.keys.device
        slots: list[int] = []
        positions: list[int] = []
        for slot, past, count in spans:
            slots += [slot] * count
            positions += range(past, past + count)
        self.token_slots = torch.tensor(slots, device=device)
        self.token_positions = torch.tensor(positions, device=device)
        self.position_ids = self.token_positions.unsqueeze(0)
        # Decoding rows: one query each, one batched attention over slots [0, width).
        offsets = [0]
        for _, _, count in spans:
            offsets.append(offsets[-1] + count)
        self.decoding = [(i, s, p) for i, (s, p, c) in enumerate(spans) if c == 1]
        self.width = max((s for _, s, _ in self.decoding), default=-1) + 1
        self.decode_tokens = torch.tensor([offsets[i] for i, _, _ in self.decoding], device=device)
        self.decode_slots = torch.tensor([s for _, s, _ in self.decoding], device=device)
        self.decode_length = max((p + 1 for _, _, p in self.decoding), default=0)
        # Decoding rows in slots 0, 1, … and tokens 0, 1, … of the step (all rows
        # decoding, slots packed): their queries and outputs need no scatter.
        self.dense = [s for _, s, _ in self.decoding] == list(range(self.width)) and [
            offsets[i] for i, _, _ in self.decoding
        ] == list(range(self.width))
        # Masks are made once per step, not once per layer, as the additive masks SDPA
        # would make of boolean ones (0 where seen, -inf elsewhere: the same numbers).
        dtype = pool.keys.dtype
        if self.decoding:
            pool.clean(self.width, self.decode_length)
            lengths = torch.zeros(self.width, dtype=torch.long, device=device)
            lengths[self.decode_slots] = torch.tensor([p + 1 for _, _, p in self.decoding])
            # Slots without a decoding row see position 0 only: a defined, unused result.
            lengths.clamp_(min=1)
            span = torch.arange(self.decode_length, device=device)
            seen = (span[None, :] < lengths[:, None])[:, None, None, :]
            self.decode_mask = _additive(seen, dtype)
        # Prompt chunks: causal within the chunk, after everything cached before it.
        self.chunks = []
        for i, (slot, past, count) in enumerate(spans):
            if count > 1:
                keys = torch.arange(past + count, device=device)
                queries = torch.arange(past, past + count, device=device)
                mask = _additive(keys[None, :] <= queries[:, None], dtype)
                self.chunks.append((offsets[i], slot, past, count, mask))
        self._grouped: dict[int, torch.Tensor] = {}  # chunk masks for each query group

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """Store this step's keys/values in their slots, then attend: [1, tokens, heads, dim]."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        # key[0]: [kv_heads, tokens, dim] -> [tokens, kv_heads, dim], one write per layer.
        keys[self.token_slots, :, self.token_positions] = key[0].transpose(0, 1)
        values[self.token_slots, :, self.token_positions] = value[0].transpose(0, 1)
        heads, dim = query.shape[1], query.shape[3]
        kv_heads = keys.shape[1]
        group = heads // kv_heads
        out = query.new_empty((1, query.shape[2], heads, dim))
        if self.decoding:
            # Query heads grouped under their key/value head (as repeat_kv orders them),
            # so grouped-query attention needs no copy of the keys.
            if self.dense:
                picked = query[0, :, : self.width].transpose(0, 1)  # [rows, heads, dim]
                q = picked.reshape(self.width, kv_heads, group, dim)
            else:
                q = query.new_zeros((self.width, kv_heads, group, dim))
                picked = query[0, :, self.decode_tokens].transpose(0, 1)
                q[self.decode_slots] = picked.reshape(-1, kv_heads, group, dim)
            length = self.decode_length
            attended = F.scaled_dot_product_attention(
                q,
                keys[: self.width, :, :length],
                values[: self.width, :, :length],
                attn_mask=self.decode_mask,
                scale=scaling,
            )
            if self.dense and not self.chunks:
                return attended.reshape(1, self.width, heads, dim)
            if self.dense:
                out[0, : self.width] = attended.reshape(-1, heads, dim)
            else:
                out[0, self.decode_tokens] = attended[self.decode_slots].reshape(-1, heads, dim)
        for index, (start, slot, past, count, mask) in enumerate(self.chunks):
            q = query[0, :, start : start + count].reshape(kv_heads, group * count, dim)
            grouped = self._grouped.get(index)
            if grouped is None:  # the first layer's: the same for every layer
                grouped = self._grouped[index] = mask.repeat(group, 1)
            attended = F.scaled_dot_product_attention(
                q.unsqueeze(0),
                keys[slot : slot + 1, :, : past + count],
                values[slot : slot + 1, :, : past + count],
                attn_mask=grouped,
                scale=scaling,
            )
            rows = attended[0].reshape(kv_heads, group, count, dim).reshape(heads, count, dim)
            out[0, start : start + count] = rows.transpose(0, 1)
        return out


def _additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as SDPA turns it into numbers: 0 where seen, -inf not."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(
        seen.logical_not(), float("-inf")
    )


@dataclass
class Prefix:
    ids: list[int]
    kv: torch.Tensor  # [2, layers, kv_heads, len(ids), dim]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixStore:
    """Finished turns' caches by conversation, least recently used first out, and
    dropped after `idle_seconds` unused (a cache holds people's words: no longer than
    memory keeps them)."""

    def __init__(
        self,
        budget_bytes: int,
        idle_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget_bytes
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._entries: OrderedDict[str, Prefix] = OrderedDict()
        self._used: dict[str, float] = {}  # key -> when last put or got
        self.nbytes = 0

    def expire(self) -> float | None:
        """Drop the entries idle past `idle_seconds`; seconds until the next one is
        due (None: nothing will be)."""
        if self.idle_seconds is None:
            return None
        now = self._clock()
        while self._entries:
            oldest = next(iter(self._entries))
            due = self._used.get(oldest, now) + self.idle_seconds
            if due > now:
                return due - now
            self.take(oldest)
        return None

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: str) -> Prefix | None:
        """The conversation's cache, removed: a running row owns it until it ends."""
        entry = self._entries.pop(key, None)
        self._used.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry

    def peek(self, key: str) -> Prefix | None:
        return self._entries.get(key)

    def get(self, key: str) -> Prefix | None:
        """The entry, kept (and now the most recently used)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self._used[key] = self._clock()
        return entry

    def put(self, key: str, entry: Prefix) -> None:
        self.forget(key)
        if entry.nbytes > self.budget:
            return
        self._entries[key] = entry
        self._used[key] = self._clock()
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            self.take(next(iter(self._entries)))

    def forget(self, key: str) -> None:
        self.take(key)


def opening(prompt_for: Callable[[str], list[int]]) -> list[int]:
    """The tokens a prompt has whatever its new message says: where the prompts for
    two different messages part. What a cache can hold ahead of the message."""
    one, other = prompt_for("a"), prompt_for("b")
    return one[: common_prefix(one, other)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
