"""Token ids to text, incrementally, for streaming a reply as it is generated."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class TextStream:
    """Decodes one reply's tokens as they come, handing new text to `sink`.

    Text is handed out at word ends (and held back while a UTF-8 sequence is
    incomplete), like transformers' TextStreamer, so a word never changes after it
    was shown.
    """

    def __init__(self, tokenizer: Any, sink: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._sink = sink
        self.tokens: list[int] = []
        self._sent = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        self._flush(final=False)

    def close(self) -> str:
        """Hand out the rest; the whole text."""
        return self._flush(final=True)

    def text(self) -> str:
        return str(self._tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _flush(self, final: bool) -> str:
        text = whole = self.text()
        if not final:
            if text.endswith("\ufffd"):
                return whole  # a multi-byte character is not complete yet
            if not text.endswith("\n"):
                text = text[: text.rfind(" ") + 1]  # the last word may still grow
        if len(text) > self._sent:
            self._sink(text[self._sent :])
            self._sent = len(text)
        return whole
