"""Attached files: which are read, bounded downloads, and how the model and the person
see them (the platforms' downloads are tested through their fakes)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.attachments import FileRef, decode, display_name, is_text, prompt_text, read_files
from bot.engine import Engine
from bot.inference.generation import Generator
from bot.inference.loader import LoadedModel
from bot.inference.local import LocalBackend
from bot.messages import ConversationKey, FileText, Message
from bot.store.memory import InProcessMemory
from tests.conftest import make_settings
from tests.scripted import ScriptedModel


def ref(name: str, content_type: str = "", size: int = 10) -> FileRef:
    return FileRef(name, size, content_type, f"https://files.example/{name}")


@pytest.mark.parametrize(
    ("name", "content_type", "text"),
    [
        ("notes.txt", "text/plain; charset=utf-8", True),
        ("app.log", "application/octet-stream", True),
        ("main.ts", "video/mp2t", True),  # by its name, whatever the type says
        ("data.json", "application/json", True),
        ("Dockerfile", "", True),
        ("page.html", "text/html", True),
        ("config", "application/yaml", True),
        ("photo.png", "image/png", False),
        ("archive.zip", "application/zip", False),
        ("blob", "", False),
        ("report.pdf", "application/pdf", False),
    ],
)
def test_text_files_by_type_or_name(name: str, content_type: str, text: bool) -> None:
    assert is_text(ref(name, content_type)) is text


def test_any_bytes_decode() -> None:
    assert decode("héllo".encode()) == "héllo"
    assert decode(b"\xef\xbb\xbfbom") == "bom"
    assert decode("utf16 ✓".encode("utf-16")) == "utf16 ✓"
    assert decode(b"bad \xff\xfe\x00 bytes") == "bad \ufffd\ufffd bytes"  # NUL dropped


async def test_file_names_carry_no_markup_into_notes() -> None:
    async def fetch(file: FileRef, limit: int) -> bytes:
        return b""

    hostile = ref("[Sign in again](https://evil.example/login) <!channel> *x*.png", "image/png")
    read = await read_files([hostile], fetch, max_bytes=100, seconds_each=1, where="x")
    assert read.notes == (
        "(I read text files only, so I skipped “Sign in again https: evil.example/login "
        "!channel x .png”.)",
    )


async def test_file_names_carry_no_bare_links_into_notes_or_the_prompt() -> None:
    """A bare URL as a file name ("https://…", "www.…") is inert text: Discord and
    Slack make a link of "://" and of a "www." host, so neither survives."""

    async def fetch(file: FileRef, limit: int) -> bytes:
        return b"text"

    names = [
        "https://evil.example/reset-password.png",
        "HTTP://evil.example/a.png",
        "www.evil.example.png",
        "see WWW.evil.example.jpg",
        "ftp://evil.example/notes.txt",
    ]
    refs = [ref(n, "text/plain" if n.endswith(".txt") else "image/png") for n in names]
    read = await read_files(refs, fetch, max_bytes=100, seconds_each=1, where="x")
    shown = [*read.notes, *(f.name for f in read.files)]
    for text in shown:
        assert "://" not in text and "www." not in text.lower(), text
    assert read.notes[0] == (
        "(I read text files only, so I skipped “https: evil.example/reset-password.png”, "
        "“HTTP: evil.example/a.png”, “www evil.example.png” and 1 more.)"
    )
    assert [f.name for f in read.files] == ["ftp: evil.example/notes.txt"]
    # Ordinary names are left as they are.
    assert display_name(ref("awww.txt")) == "awww.txt"
    assert display_name(ref("deploy.2024-11.log")) == "deploy.2024-11.log"


def test_the_question_comes_before_the_files() -> None:
    text = prompt_text("What fails here?", [FileText("app.log", "line 1\nERROR x\n")])
    assert text == "What fails here?\n\nAttached file app.log:\n```\nline 1\nERROR x\n```"
    assert prompt_text("  ", []) == ""


async def test_reading_decides_downloads_and_notes(caplog: pytest.LogCaptureFixture) -> None:
    fetched: list[str] = []
    bodies = {"a.txt": b"alpha", "lying.txt": b"x" * 500}

    async def fetch(file: FileRef, limit: int) -> bytes:
        fetched.append(file.name)
        if file.name == "broken.txt":
            raise ConnectionError("reset by peer")
        if file.name == "slow.md":
            await asyncio.sleep(30)
        return bodies[file.name][: limit + 1]

    refs = [
        ref("a.txt", "text/plain", 5),
        ref("photo.png", "image/png"),
        ref("huge.csv", "text/csv", 10_000),
        ref("lying.txt", "text/plain", 50),  # declared small, is not
        ref("broken.txt", "text/plain"),
        ref("slow.md", "text/markdown"),
    ]
    with caplog.at_level(logging.WARNING):
        read = await read_files(refs, fetch, max_bytes=100, seconds_each=0.2, where="discord:7")
    assert read.files == (FileText("a.txt", "alpha"),)
    assert sorted(fetched) == ["a.txt", "broken.txt", "lying.txt", "slow.md"]  # not the rest
    assert read.notes == (
        "(I read text files only, so I skipped “photo.png”.)",
        "(I skipped “huge.csv”, “lying.txt”: I read files of up to 100 bytes.)",
        "(I couldn't download “broken.txt”, “slow.md”, so I answered without them.)",
    )
    logged = [r.getMessage() for r in caplog.records]
    assert any("broken.txt" in m and "discord:7" in m and "failed" in m for m in logged)
    assert any("slow.md" in m and "discord:7" in m and "timed out" in m for m in logged)


async def test_reading_nothing_when_turned_off() -> None:
    async def fetch(file: FileRef, limit: int) -> bytes:
        raise AssertionError("no download when ATTACHMENT_MAX_BYTES=0")

    read = await read_files([ref("a.txt")], fetch, max_bytes=0, seconds_each=1, where="x")
    assert read.files == () and read.notes == ("(I don't read attached files here.)",)


async def test_the_engine_reads_files_and_shows_notes_first() -> None:
    model = ScriptedModel("It fails on line 2.")
    engine = Engine(LocalBackend(model), InProcessMemory(20, 600))
    channel = ConversationKey("slack", "C1", "1.0")
    message = Message(
        channel,
        "U1",
        "Ann",
        "why?",
        files=(FileText("app.log", "ok\nERROR boom"),),
        notes=("(I read text files only, so I skipped “x.png”.)",),
    )
    reply = await engine.reply(message)
    assert reply.text == "(I read text files only, so I skipped “x.png”.)\n\nIt fails on line 2."
    assert model.inputs == ["why?\n\nAttached file app.log:\n```\nok\nERROR boom\n```"]
    # The file is part of the stored turn: follow-ups can ask about it.
    assert "ERROR boom" in (await engine.memory.history(channel))[0].content
    # A message of only an image: the note is the answer, the model is not called.
    only = Message(
        channel, "U1", "Ann", "", notes=("(I read text files only, so I skipped “y.png”.)",)
    )
    assert (await engine.reply(only)).text == "(I read text files only, so I skipped “y.png”.)"
    # A file and no text: answered.
    alone = Message(channel, "U1", "Ann", "", files=(FileText("a.md", "# Title"),))
    assert (await engine.reply(alone)).text == "It fails on line 2."
    assert len(model.inputs) == 2
    await engine.close()


async def test_the_real_model_with_default_settings_reads_a_big_file(bundled: LoadedModel) -> None:
    """The bundled model, default settings, a shared channel: a 100 kB log attached to a
    question is cut to the prompt budget (the reply says so) and answered; the stored
    turn is what the model read, not the whole file."""
    engine = Engine(
        LocalBackend(Generator.from_settings(bundled, make_settings())), InProcessMemory(20, 600)
    )
    log_text = "".join(f"2026-11-30 12:{i % 60:02d} INFO request {i} ok\n" for i in range(2500))
    assert len(log_text) > 90_000
    channel = ConversationKey("discord", "9")
    message = Message(
        channel,
        "1",
        "Ann",
        "Is there an error in this log?",
        files=(FileText("app.log", log_text),),
    )
    reply = await engine.reply(message)
    assert reply.ok and reply.truncated_input
    assert reply.text.startswith("(Your message was too long for me")
    stored = (await engine.memory.history(channel))[0].content
    assert stored.startswith("Is there an error in this log?\n\nAttached file app.log:")
    assert len(stored) < len(log_text) // 4
    await engine.close()
