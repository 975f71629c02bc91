"""Splitting a long reply into messages that fit a platform's length limit.

Cuts at a paragraph break, else a line break, else a space, else between grapheme
clusters (an emoji with its modifiers, a letter with its accents stays whole). A
code block cut in two is closed at the end of one message and reopened, with its
language tag, at the start of the next. Lengths are counted in UTF-16 code units,
which is at least the count of code points: a part fits whichever way a platform
counts.
"""

from __future__ import annotations

import re

import regex

_FENCE = re.compile(r"^[ \t]*```([^\s`]*)", re.MULTILINE)
_GRAPHEME = regex.compile(r"\X")
_CLOSE = "\n```"


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _fit(text: str, budget: int) -> int:
    """The largest index i with utf16_len(text[:i]) <= budget."""
    if utf16_len(text) <= budget:
        return len(text)
    index = min(len(text), max(budget, 0))  # code points <= UTF-16 units
    units = utf16_len(text[:index])
    while index > 0 and units > budget:
        index -= 1
        units -= 2 if ord(text[index]) > 0xFFFF else 1
    return index


def open_fence(text: str) -> str | None:
    """The language tag of a code block left open at the end of `text` ('' if none
    given), or None when every block is closed."""
    language: str | None = None
    for match in _FENCE.finditer(text):
        language = match.group(1) if language is None else None
    return language


def _break_point(text: str, end: int) -> tuple[int, int]:
    """Where to cut `text` at or before `end`: (end of this part, start of the next)."""
    for separator in ("\n\n", "\n"):
        at = text.rfind(separator, 0, end)
        if at > 0:
            return at, at + len(separator)
    spaces = [m.start() for m in re.finditer(r"\s", text[:end])]
    if spaces and spaces[-1] > 0:
        return spaces[-1], spaces[-1] + 1
    cut = 0
    for cluster in _GRAPHEME.finditer(text):
        if cluster.end() > end:
            break
        cut = cluster.end()
    # One grapheme longer than the limit (a flood of combining marks): cut inside it.
    cut = cut or end
    return cut, cut


def split_message(text: str, limit: int) -> list[str]:
    """`text` as parts of at most `limit` UTF-16 units each, in order."""
    if limit <= len(_CLOSE) + 16:
        raise ValueError("limit too small to split code blocks")
    parts: list[str] = []
    reopen = ""
    rest = text
    while rest:
        if utf16_len(reopen + rest) <= limit:
            parts.append(reopen + rest)
            break
        budget = limit - utf16_len(reopen) - len(_CLOSE)
        end, next_start = _break_point(rest, max(_fit(rest, budget), 1))
        piece = reopen + rest[:end]
        language = open_fence(piece)
        if language is not None:
            piece += _CLOSE
            reopen = f"```{language[:24]}\n"  # a hostile, huge tag is not carried whole
        else:
            reopen = ""
        if piece.strip():
            parts.append(piece)
        rest = rest[next_start:]
        if not reopen:
            rest = rest.lstrip("\n")
    return parts
