"""Prompts: chat history to model input ids, fitted to the model's token budget.

Decoder-only chat models get the tokenizer's chat template with the system prompt
first. Encoder-decoder chat models (BlenderBot) get the dialogue turns alone, in the
format they were trained on: their tokenizer's template when it has one, else
BlenderBot's own (user turns prefixed by a space, turns joined by two spaces, then
the end-of-sequence token).
"""

from __future__ import annotations

import bisect
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from bot.inference.backend import Prompt, with_name
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
    """How a model wants its conversation: with a system prompt, or turns only; and
    how it is told who said a turn: the template's `name` field where the template
    renders it (`names_in_template`), else the name before the turn's text."""

    is_encoder_decoder: bool
    system_prompt: str
    names_in_template: bool = False

    def messages(
        self, history: Sequence[Turn], user_text: str, speaker: str | None = None
    ) -> list[dict[str, str]]:
        """Chat messages; with `speaker` (the new message's author), each user turn
        carries its author's name (names are cleaned when stored: bot.messages)."""
        named = speaker is not None
        messages = [
            self._message(t.role, t.content, t.author_name if named else "") for t in history
        ]
        messages.append(self._message("user", user_text, speaker or ""))
        if not self.is_encoder_decoder and self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _message(self, role: str, content: str, name: str) -> dict[str, str]:
        if not name or role != "user":
            return {"role": role, "content": content}
        if self.names_in_template:
            return {"role": role, "content": content, "name": name}
        return {"role": role, "content": with_name(name, content)}


def _render(
    tokenizer: ChatTokenizer, is_encoder_decoder: bool, messages: list[dict[str, str]]
) -> str:
    if is_encoder_decoder:
        template = tokenizer.chat_template or BLENDERBOT_TEMPLATE
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    else:
        rendered = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    return str(rendered)


def renders_names(tokenizer: ChatTokenizer, is_encoder_decoder: bool) -> bool:
    """Whether the model's chat template shows a message's `name` field."""
    probe = "\x00name-probe\x00"
    message = {"role": "user", "content": "hello", "name": probe}
    try:
        return probe in _render(tokenizer, is_encoder_decoder, [message])
    except Exception:  # a template that rejects the field: names go in the text
        return False


def encode(
    tokenizer: ChatTokenizer, fmt: PromptFormat, messages: list[dict[str, str]]
) -> list[int]:
    """Token ids of the whole prompt, ready for the model.

    The template is rendered around placeholders, so its structure (turn markers,
    roles, BOS/EOS) is tokenized apart from the contents, and every content (user
    text, history, persona, model replies) is tokenized as plain text: a
    `<|im_start|>` typed by a user stays those characters, never the special token.
    """
    nonce = secrets.token_hex(8)
    # Every field a user can write (content, name) is a placeholder while rendering.
    stand_ins = [
        {k: f"\x00{nonce}:{i}:{k}\x00" if k in ("content", "name") else v for k, v in m.items()}
        for i, m in enumerate(messages)
    ]
    rendered = _render(tokenizer, fmt.is_encoder_decoder, stand_ins)
    ids: list[int] = []
    position = 0
    for mark in re.finditer(f"\x00{nonce}:(\\d+):(content|name)\x00", rendered):
        if mark.start() > position:  # template text before it
            ids += tokenizer.encode(rendered[position : mark.start()], add_special_tokens=False)
        ids += encode_text(tokenizer, messages[int(mark.group(1))][mark.group(2)])
        position = mark.end()
    if position < len(rendered):
        ids += tokenizer.encode(rendered[position:], add_special_tokens=False)
    return ids


def encode_text(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """`text` as plain-text tokens: no special or added token can come out of it."""
    ids = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    added = _added_ids(tokenizer)
    if not added.intersection(ids):
        return list(ids)
    # A non-special added token still matched: spell it out character by character
    # (one character is too short to match a whole added token).
    out: list[int] = []
    for token in ids:
        if token in added:
            for char in tokenizer.decode([token]):
                out += tokenizer.encode(char, add_special_tokens=False, split_special_tokens=True)
        else:
            out.append(token)
    return out


def _added_ids(tokenizer: ChatTokenizer) -> frozenset[int]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(int(i) for i in decoder)


def build_prompt(
    tokenizer: ChatTokenizer,
    fmt: PromptFormat,
    history: Sequence[Turn],
    user_text: str,
    budget: int,
    *,
    sliding: bool = False,
    speaker: str | None = None,
) -> Prompt:
    """The history that fits in `budget` tokens with the new message.

    The oldest turns go first, and only whole exchanges (the kept history starts
    with a user turn). The system prompt and the new message always stay; when the
    new message alone is over budget, its end is cut.

    Where older turns must go (over budget, or `sliding`: the memory is full and
    drops its oldest exchange at every turn), the kept history starts at an anchor:
    an exchange picked by a hash of its text, about one in ANCHOR_EVERY. The start
    then stays put for several turns, so the prompt's beginning, and the model cache
    kept for it, stays the same between them instead of changing at every turn; the
    price is a few of the oldest exchanges that would have fitted.

    `speaker`: the new message's author, when the model is to see who said each turn.
    """
    if len(user_text) > budget * MAX_CHARS_PER_TOKEN:
        # Cannot fit whatever the history: cut it by characters first, so that a huge
        # message (a paste, attached files) is not tokenized whole at every probe.
        return _cut_message(tokenizer, fmt, user_text, budget, speaker)
    # Kept history must start at a user turn: some chat templates refuse otherwise.
    starts = [i for i, turn in enumerate(history) if turn.role == "user"] + [len(history)]

    def size(start: int, text: str) -> int:
        return len(encode(tokenizer, fmt, fmt.messages(history[start:], text, speaker)))

    # Fewer turns dropped means a longer prompt: find the first start that fits.
    first_fit = bisect.bisect_left(starts, True, key=lambda s: size(s, user_text) <= budget)
    if first_fit < len(starts):
        start = starts[first_fit]
        if start > 0 or sliding:
            # At most 2 * ANCHOR_EVERY more exchanges dropped to reach an anchor.
            near = starts[first_fit : min(first_fit + 2 * ANCHOR_EVERY, len(starts) - 1)]
            start = next((s for s in near if _anchor(history[s])), start)
        ids = encode(tokenizer, fmt, fmt.messages(history[start:], user_text, speaker))
        return Prompt(ids, user_text, len(history) - start, False, len(user_text))
    return _cut_message(tokenizer, fmt, user_text, budget, speaker)


ANCHOR_EVERY = 4


def _anchor(turn: Turn) -> bool:
    """Whether a kept history may start at this turn (stable across processes)."""
    digest = hashlib.blake2b(turn.content.encode("utf-8"), digest_size=1).digest()
    return digest[0] % ANCHOR_EVERY == 0


# A token is rarely longer than this many characters (and the cut is checked in tokens).
MAX_CHARS_PER_TOKEN = 32


def _cut_message(
    tokenizer: ChatTokenizer, fmt: PromptFormat, text: str, budget: int, speaker: str | None
) -> Prompt:
    overhead = len(encode(tokenizer, fmt, fmt.messages([], "", speaker)))
    tokens = encode_text(tokenizer, text[: budget * MAX_CHARS_PER_TOKEN])
    keep = max(budget - overhead, 0)
    while True:
        cut = tokenizer.decode(tokens[:keep])
        ids = encode(tokenizer, fmt, fmt.messages([], cut, speaker))
        # Decoding and re-encoding can merge tokens differently: shrink until it fits.
        if len(ids) <= budget or keep == 0:
            return Prompt(ids, cut, 0, True, len(text))
        keep = max(keep - max(len(ids) - budget, 1), 0)
