"""Splitting long replies: boundaries, code fences, emoji and grapheme clusters."""

from __future__ import annotations

import pytest

from bot.splitting import open_fence, split_message, utf16_len


def rejoin(parts: list[str]) -> str:
    return " ".join(" ".join(p.split()) for p in parts)


def test_short_text_is_one_part() -> None:
    assert split_message("hello", 2000) == ["hello"]
    assert split_message("", 2000) == []


def test_prefers_paragraph_then_line_then_word() -> None:
    para = "a" * 60 + "\n\n" + "b" * 60
    assert split_message(para, 100) == ["a" * 60, "b" * 60]
    lines = "a" * 60 + "\n" + "b" * 60
    assert split_message(lines, 100) == ["a" * 60, "b" * 60]
    words = ("word " * 50).strip()
    parts = split_message(words, 100)
    assert all(len(p) <= 100 for p in parts)
    assert all(not p.startswith(" ") and not p.endswith("wor") for p in parts)
    assert rejoin(parts) == words


def test_every_part_fits_and_nothing_is_lost() -> None:
    text = "\n".join(f"Line {i}: " + "lorem ipsum " * (i % 7) for i in range(400))
    parts = split_message(text, 2000)
    assert len(parts) > 1
    assert all(utf16_len(p) <= 2000 for p in parts)
    assert rejoin(parts) == " ".join(text.split())


def test_code_block_is_closed_and_reopened_with_its_language() -> None:
    code = "```python\n" + "\n".join(f"print({i})" for i in range(300)) + "\n```\nDone."
    parts = split_message(code, 500)
    assert len(parts) > 2
    for part in parts[:-1]:
        assert part.startswith("```python\n") and part.endswith("\n```")
        assert open_fence(part) is None
    assert parts[-1].endswith("Done.") and parts[-1].startswith("```python\n")
    assert all(utf16_len(p) <= 500 for p in parts)
    body = [line for p in parts for line in p.splitlines() if not line.startswith("```")]
    assert body == [f"print({i})" for i in range(300)] + ["Done."]


def test_emoji_and_graphemes_are_never_cut() -> None:
    family = "👩‍👩‍👧‍👦"  # one grapheme of 7 code points, 11 UTF-16 units
    text = family * 300
    parts = split_message(text, 100)
    assert "".join(parts) == text
    assert all(utf16_len(p) <= 100 for p in parts)
    assert all(len(p) % len(family) == 0 for p in parts)
    accented = "e\u0301" * 500  # é as e + combining acute
    parts = split_message(accented, 101)
    assert all(not p.startswith("\u0301") for p in parts)
    assert "".join(parts) == accented


def test_hostile_inputs_terminate() -> None:
    flood = "a" + "\u0301" * 5000  # one grapheme far over the limit
    parts = split_message(flood, 2000)
    assert "".join(parts) == flood and all(utf16_len(p) <= 2000 for p in parts)
    huge_tag = "```" + "x" * 5000 + "\n" + "code\n" * 1000 + "```"
    assert all(utf16_len(p) <= 2000 for p in split_message(huge_tag, 2000))
    assert split_message("\n" * 5000, 2000) == []
    with pytest.raises(ValueError):
        split_message("text", 10)
