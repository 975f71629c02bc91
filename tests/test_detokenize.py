"""Streaming detokenization: the pieces handed out add up to the whole reply's text,
words are shown only once complete, and each token costs a short decode."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bot.inference.detokenize import TextStream
from bot.inference.loader import LoadedModel

TEXTS = [
    "The capital of France is Paris.",
    "Line one\nline two\n\n  indented  code()\n\tand a tab",
    "Emoji 🎉🇫🇷👩‍👩‍👧 and 日本語のテキスト, café, naïve, Ünïcödé.",
    "Numbers 3.14159 and 1,000,000; punctuation!?… «quotes» — dashes",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "   leading spaces, trailing spaces   ",
    "x" * 300 + " " + "word " * 200,
]


class Counting:
    """A tokenizer that counts how many token ids it was asked to decode."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decoded = 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decoded += len(ids)
        return str(self.inner.decode(ids, **kwargs))


def stream(tokenizer: Any, ids: list[int]) -> tuple[list[str], str]:
    pieces: list[str] = []
    text = TextStream(tokenizer, pieces.append)
    for token in ids:
        text.add(token)
        # Nothing is shown that the final text does not start with.
        assert tokenizer.decode(text.tokens, skip_special_tokens=True).startswith("".join(pieces))
    return pieces, text.close()


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (▁ for spaces, byte fallback), trained here."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace()]
    )
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>", *bytes_])
    tok.train_from_iterator(TEXTS * 3, trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.model
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_text(bundled: LoadedModel, text: str) -> None:
    tokenizer = bundled.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, whole = stream(tokenizer, ids)
    assert whole == tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == whole
    # Before the end, every piece ends a word (or a line).
    for piece in pieces[:-1]:
        assert piece.endswith((" ", "\n")), piece


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_style_spaces_are_kept(text: str) -> None:
    tokenizer = metaspace_tokenizer()
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, whole = stream(tokenizer, ids)
    assert "".join(pieces) == whole == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.model
def test_a_long_reply_costs_linear_decoding(bundled: LoadedModel) -> None:
    ids = bundled.tokenizer.encode("word and more words " * 400, add_special_tokens=False)
    assert len(ids) > 1500
    counting = Counting(bundled.tokenizer)
    text = TextStream(counting, lambda _piece: None)
    for token in ids:
        text.add(token)
    text.close()
    # A few short windows per token and one whole decode at the end; decoding the
    # whole reply at every token (the old way) is ~n²/2 = over a million ids here.
    assert counting.decoded < 6 * len(ids)


@pytest.mark.model
def test_incomplete_characters_wait_then_come_whole(bundled: LoadedModel) -> None:
    tokenizer = bundled.tokenizer
    ids = tokenizer.encode(" 🎉🎉🎉 done ", add_special_tokens=False)
    pieces, whole = stream(tokenizer, ids)
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == whole
