"""Token ids to text, incrementally, for streaming a reply as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Tokens held back for an incomplete character before the text is taken as it is
# (a model can write bytes that never form one; a character needs at most 4).
PENDING_MAX = 8


class TextStream:
    """Decodes one reply's tokens as they come, handing new text to `sink`.

    Text is handed out at word ends (and held back while a UTF-8 sequence is
    incomplete), like transformers' TextStreamer, so a word never changes after it
    was shown.

    Each token costs the decoding of a short window, not of the whole reply (which
    made a long reply quadratic): the window's text beyond its first, already
    decoded tokens is the new text. The first tokens give the decoder its context
    (SentencePiece drops a leading space at a text's start). `close` decodes the
    whole reply once, and that is the text returned.
    """

    def __init__(self, tokenizer: Any, sink: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._sink = sink
        self.tokens: list[int] = []
        self._text = ""  # the decoded text of tokens[: self._read]
        self._start = 0  # the window's first token
        self._read = 0
        self._sent = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        context = self._decode(self.tokens[self._start : self._read])
        window = self._decode(self.tokens[self._start :])
        if window.endswith("\ufffd") and len(self.tokens) - self._read < PENDING_MAX:
            return  # a multi-byte character is not complete yet
        if window.startswith(context):
            self._text += window[len(context) :]
        else:  # the decoder rewrote its context (space clean-up): read it all again
            self._text = self._decode(self.tokens)
        self._start, self._read = self._read, len(self.tokens)
        self._flush(self._text, final=False)

    def close(self) -> str:
        """Hand out the rest; the whole text."""
        return self._flush(self.text(), final=True)

    def text(self) -> str:
        return self._decode(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return str(self._tokenizer.decode(tokens, skip_special_tokens=True)) if tokens else ""

    def _flush(self, whole: str, final: bool) -> str:
        text = whole
        if not final and not text.endswith("\n"):
            text = text[: text.rfind(" ") + 1]  # the last word may still grow
        if len(text) > self._sent:
            self._sink(text[self._sent :])
            self._sent = len(text)
        return whole
