"""Prompts: chat history to model input ids, fitted to the model's token budget.

Decoder-only chat models get the tokenizer's chat template with the system prompt
first. Encoder-decoder chat models (BlenderBot) get the dialogue turns alone, in the
format they were trained on: their tokenizer's template when it has one, else
BlenderBot's own (user turns prefixed by a space, turns joined by two spaces, then
the end-of-sequence token).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bot.messages import Turn

BLENDERBOT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' ' }}{% endif %}"
    "{{ message['content'] }}"
    "{% if not loop.last %}{{ '  ' }}{% endif %}"
    "{% endfor %}"
    "{{ eos_token }}"
)


class ChatTokenizer(Protocol):
    """The part of a transformers tokenizer that prompt building uses."""

    chat_template: str | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class PromptFormat:
    """How a model wants its conversation: with a system prompt, or turns only."""

    is_encoder_decoder: bool
    system_prompt: str

    def messages(self, history: Sequence[Turn], user_text: str) -> list[dict[str, str]]:
        messages = [{"role": t.role, "content": t.content} for t in history]
        messages.append({"role": "user", "content": user_text})
        if not self.is_encoder_decoder and self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages


def encode(
    tokenizer: ChatTokenizer, fmt: PromptFormat, messages: list[dict[str, str]]
) -> list[int]:
    """Token ids of the whole prompt, ready for the model."""
    if fmt.is_encoder_decoder:
        template = tokenizer.chat_template or BLENDERBOT_TEMPLATE
        ids = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=True, return_dict=False
        )
    else:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    # Some tokenizers return a nested list (a batch of one).
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


@dataclass(frozen=True)
class Prompt:
    """A prompt fitted to the budget."""

    input_ids: list[int]
    user_text: str  # the user's message as the model saw it (cut when too long)
    kept_turns: int  # history turns that fit
    truncated: bool  # True when the user's message itself had to be cut
    original_chars: int
    messages: tuple[dict[str, str], ...] = ()  # for servers that take chat messages


def build_prompt(
    tokenizer: ChatTokenizer,
    fmt: PromptFormat,
    history: Sequence[Turn],
    user_text: str,
    budget: int,
) -> Prompt:
    """The longest suffix of `history` that fits in `budget` tokens with the new message.

    The oldest turns go first, and only whole exchanges (the kept history starts
    with a user turn). The system prompt and the new message always stay; when the
    new message alone is over budget, its end is cut.
    """
    # Kept history must start at a user turn: some chat templates refuse otherwise.
    starts = [i for i, turn in enumerate(history) if turn.role == "user"] + [len(history)]

    def size(start: int, text: str) -> int:
        return len(encode(tokenizer, fmt, fmt.messages(history[start:], text)))

    # Fewer turns dropped means a longer prompt: find the first start that fits.
    first_fit = bisect.bisect_left(starts, True, key=lambda s: size(s, user_text) <= budget)
    if first_fit < len(starts):
        start = starts[first_fit]
        ids = encode(tokenizer, fmt, fmt.messages(history[start:], user_text))
        return Prompt(ids, user_text, len(history) - start, False, len(user_text))
    return _cut_message(tokenizer, fmt, user_text, budget)


def _cut_message(tokenizer: ChatTokenizer, fmt: PromptFormat, text: str, budget: int) -> Prompt:
    overhead = len(encode(tokenizer, fmt, fmt.messages([], "")))
    tokens = tokenizer.encode(text, add_special_tokens=False)
    keep = max(budget - overhead, 0)
    while True:
        cut = tokenizer.decode(tokens[:keep], skip_special_tokens=True)
        ids = encode(tokenizer, fmt, fmt.messages([], cut))
        # Decoding and re-encoding can merge tokens differently: shrink until it fits.
        if len(ids) <= budget or keep == 0:
            return Prompt(ids, cut, 0, True, len(text))
        keep = max(keep - max(len(ids) - budget, 1), 0)
