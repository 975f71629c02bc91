"""Prompt building and the token budget, with the bundled model's own tokenizer."""

from __future__ import annotations

from typing import Any

from bot.messages import Turn
from bot.model import LoadedModel
from bot.prompt import BLENDERBOT_TEMPLATE, PromptFormat, build_prompt, encode

CHAT = PromptFormat(is_encoder_decoder=False, system_prompt="You are Testbot.")


def history(pairs: int) -> list[Turn]:
    out: list[Turn] = []
    for i in range(pairs):
        out += [Turn("user", f"question number {i}"), Turn("assistant", f"answer number {i}")]
    return out


def text_of(bundled: LoadedModel, ids: list[int]) -> str:
    return str(bundled.tokenizer.decode(ids))


def test_chat_template_with_system_prompt_first(bundled: LoadedModel) -> None:
    prompt = build_prompt(bundled.tokenizer, CHAT, history(1), "hello there", budget=1000)
    text = text_of(bundled, prompt.input_ids)
    assert text.startswith("<|im_start|>system\nYou are Testbot.<|im_end|>")
    assert text.index("question number 0") < text.index("answer number 0")
    assert text.index("answer number 0") < text.index("hello there")
    assert text.endswith("<|im_start|>assistant\n")
    assert (prompt.kept_turns, prompt.truncated) == (2, False)


def test_oldest_turns_go_first_and_newest_message_stays(bundled: LoadedModel) -> None:
    turns = history(10)
    full = build_prompt(bundled.tokenizer, CHAT, turns, "the newest message", budget=10_000)
    budget = len(full.input_ids) - 20  # too small for everything
    prompt = build_prompt(bundled.tokenizer, CHAT, turns, "the newest message", budget)
    text = text_of(bundled, prompt.input_ids)
    assert len(prompt.input_ids) <= budget
    assert "question number 0" not in text
    assert "answer number 9" in text and "the newest message" in text
    assert "You are Testbot." in text
    # Whole exchanges only: the kept history starts with a user turn.
    assert prompt.kept_turns % 2 == 0 and 0 < prompt.kept_turns < 20
    # It keeps as much as fits: one more exchange would be over budget.
    more = encode(
        bundled.tokenizer,
        CHAT,
        CHAT.messages(turns[-prompt.kept_turns - 2 :], "the newest message"),
    )
    assert len(more) > budget


def test_message_longer_than_budget_is_cut_not_refused(bundled: LoadedModel) -> None:
    huge = "word " * 5000
    prompt = build_prompt(bundled.tokenizer, CHAT, history(3), huge, budget=300)
    assert prompt.truncated
    assert len(prompt.input_ids) <= 300
    assert prompt.kept_turns == 0
    assert huge.startswith(prompt.user_text) and 0 < len(prompt.user_text) < len(huge)
    assert prompt.original_chars == len(huge)
    assert "You are Testbot." in text_of(bundled, prompt.input_ids)


def test_encoder_decoder_prompt_is_turns_only_in_blenderbot_format(bundled: LoadedModel) -> None:
    tokenizer: Any = bundled.tokenizer
    fmt = PromptFormat(is_encoder_decoder=True, system_prompt="ignored by seq2seq models")
    turns = [Turn("user", "Hi."), Turn("assistant", "Hello, how are you?")]
    messages = fmt.messages(turns, "Fine, thanks.")
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=BLENDERBOT_TEMPLATE, tokenize=False
    )
    assert rendered == " Hi.  Hello, how are you?   Fine, thanks.<|im_end|>"
    assert "ignored" not in rendered
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        ids = encode(tokenizer, fmt, messages)  # no template of its own: BlenderBot's
    finally:
        tokenizer.chat_template = saved
    assert tokenizer.decode(ids) == rendered
