"""Files attached to a message: which are read, reading them, and how the model sees them.

Adapters describe each attachment as a `FileRef` and pass a `fetch` function that
downloads one with the platform's client; `read_files` decides, downloads (bounded in
size and time) and decodes. A text file reaches the model after the message's text,
under its file name; an image or other binary file, one too big, or one whose download
failed becomes a note for the person instead, and the answer still comes.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from bot.messages import FileText, clean_text

log = logging.getLogger(__name__)

# Extensions read as text whatever content type the platform reports (many report
# application/octet-stream for .log or .ts, or nothing at all).
TEXT_EXTENSIONS = frozenset(
    """
    txt text md markdown rst org adoc tex log out err csv tsv json jsonl ndjson yaml
    yml toml ini cfg conf env properties xml html htm css scss svg py pyi ipynb js mjs
    cjs ts tsx jsx java kt kts scala go rs c h cc cpp cxx hpp cs swift m rb php pl lua
    r jl sh bash zsh fish ps1 bat sql graphql proto gradle cmake mk make dockerfile
    diff patch
    """.split()  # noqa: SIM905 - a word list reads best as words
)
TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/xml",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/javascript",
        "application/x-sh",
        "application/sql",
    }
)
TEXT_NAMES = frozenset({"dockerfile", "makefile", "readme", "license", "procfile"})
FILE_NAME_CHARS = 100
NOT_READING = "(I don't read attached files here.)"


@dataclass(frozen=True, slots=True)
class FileRef:
    """An attachment as the platform describes it (size in bytes, as declared)."""

    name: str
    size: int
    content_type: str
    url: str


# Downloads a file, returning at most `limit` + 1 bytes (so an oversized file, whatever
# its declared size, is seen to be one). Raises on failure; may hang (timed out here).
Fetch = Callable[[FileRef, int], Awaitable[bytes]]


def is_text(ref: FileRef) -> bool:
    """A text file by its content type or, failing that, its name."""
    kind = ref.content_type.split(";")[0].strip().lower()
    if kind.startswith("text/") or kind in TEXT_TYPES or kind.endswith(("+json", "+xml")):
        return True
    path = PurePosixPath(ref.name.lower())
    if path.suffix.lstrip(".") in TEXT_EXTENSIONS or path.name in TEXT_NAMES:
        return True
    guessed = mimetypes.guess_type(path.name)[0] or ""
    return not kind and guessed.startswith("text/")


def decode(data: bytes) -> str:
    """Bytes as text: UTF-8 (a BOM dropped), else UTF-16 with a BOM; undecodable bytes
    are replaced, never an error."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return clean_text(data.decode("utf-16", "replace"))
    return clean_text(data.decode("utf-8-sig", "replace"))


# Markup a name could carry into the bot's own note: a file named
# "[Sign in](https://evil.example)" must not become a link the bot posted.
_NAME_MARKUP = re.compile(r"[\[\]()<>*~`|\\]")
# What makes bare text a link in Discord and Slack: a scheme's "://", a "www." host.
_NAME_LINK = re.compile(r"://|(?<![^\W_])www\.", re.IGNORECASE)


def display_name(ref: FileRef) -> str:
    """The file's name as shown to the model and the person: one line, bounded, with
    no characters that Markdown or mrkdwn would read as a link or formatting, and no
    bare URL ("https://evil.example/reset.png" reads "https: evil.example/reset.png")."""
    name = _NAME_MARKUP.sub(" ", clean_text(ref.name))
    name = _NAME_LINK.sub(lambda m: ": " if m[0] == "://" else m[0][:3] + " ", name)
    name = " ".join(name.split())[:FILE_NAME_CHARS]
    return name or "unnamed file"


def prompt_text(text: str, files: Sequence[FileText]) -> str:
    """The message as the model reads it: its text, then each file under its name.

    The text comes first, so a prompt cut to fit the model keeps the question and
    loses the end of the files.
    """
    parts = [text.strip()] if text.strip() else []
    for file in files:
        parts.append(f"Attached file {file.name}:\n```\n{file.text.rstrip()}\n```")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class ReadFiles:
    """What came of a message's attachments: the files read, notes for the person."""

    files: tuple[FileText, ...] = ()
    notes: tuple[str, ...] = ()


def _listing(names: Sequence[str]) -> str:
    quoted = [f"“{n}”" for n in names[:3]]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(quoted) + more


async def read_files(
    refs: Sequence[FileRef],
    fetch: Fetch,
    *,
    max_bytes: int,
    seconds_each: float,
    where: str,
) -> ReadFiles:
    """Download and decode the text files among `refs`, concurrently.

    `where` names the conversation in log lines about failed downloads.
    """
    if not refs:
        return ReadFiles()
    if max_bytes <= 0:
        return ReadFiles(notes=(NOT_READING,))
    binary = [display_name(r) for r in refs if not is_text(r)]
    too_big = [display_name(r) for r in refs if is_text(r) and r.size > max_bytes]
    wanted = [r for r in refs if is_text(r) and r.size <= max_bytes]

    async def one(ref: FileRef) -> bytes | None:
        try:
            return await asyncio.wait_for(fetch(ref, max_bytes), seconds_each)
        except TimeoutError:
            log.warning("Attachment %r in %s: download timed out", display_name(ref), where)
        except Exception as exc:
            status = getattr(exc, "status", None)  # aiohttp's and discord.py's HTTP errors
            log.warning(
                "Attachment %r in %s: download failed (%s%s)",
                display_name(ref),
                where,
                type(exc).__name__,
                f" {status}" if isinstance(status, int) else "",
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        return None

    files: list[FileText] = []
    failed: list[str] = []
    for ref, data in zip(wanted, await asyncio.gather(*map(one, wanted)), strict=True):
        if data is None:
            failed.append(display_name(ref))
        elif len(data) > max_bytes:
            too_big.append(display_name(ref))  # its declared size was wrong
        else:
            files.append(FileText(display_name(ref), decode(data)))
    notes = []
    if binary:
        notes.append(f"(I read text files only, so I skipped {_listing(binary)}.)")
    if too_big:
        notes.append(f"(I skipped {_listing(too_big)}: I read files of up to {max_bytes:,} bytes.)")
    if failed:
        it = "it" if len(failed) == 1 else "them"
        notes.append(f"(I couldn't download {_listing(failed)}, so I answered without {it}.)")
    return ReadFiles(tuple(files), tuple(notes))
