"""Files attached to a message: which are read, reading them, and how the model sees them.

Adapters describe each attachment as a `FileRef` and pass a `fetch` function that
downloads one with the platform's client; `read_files` decides, downloads (bounded in
size and time) and decodes. A text file reaches the model after the message's text,
under its file name. An image (png, jpeg, webp, gif) is downloaded and decoded
(`bot.images`) only for a backend that takes images (`ImageLimits` given); else, like
any other binary file, it gets a note. Every image leaves its name as a placeholder in
the message's text (`[image: name]`, what memory keeps). A file too big, one whose
download failed, a broken image: a note for the person, and the answer still comes.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from bot.images import ImageError, ImageInput, decode_image, is_supported, looks_like_image
from bot.images import placeholder as image_placeholder
from bot.messages import FileText, clean_text
from bot.settings import Settings

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


def prompt_text(text: str, files: Sequence[FileText], images: Sequence[str] = ()) -> str:
    """The message as the model reads it: a placeholder per image (`[image: name]`, a
    few characters), its text, then each file under its name.

    The text comes before the files, so a prompt cut to fit the model keeps the
    question (and the placeholders) and loses the end of the files.
    """
    parts = [" ".join(image_placeholder(name) for name in images)] if images else []
    if text.strip():
        parts.append(text.strip())
    for file in files:
        parts.append(f"Attached file {file.name}:\n```\n{file.text.rstrip()}\n```")
    return "\n\n".join(parts)


@dataclass(frozen=True)
class ImageLimits:
    """How images are read, for a backend that takes them (IMAGE_* settings)."""

    max_bytes: int
    max_count: int
    max_side: int

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        return cls(settings.image_max_bytes, settings.image_max_count, settings.image_max_side)


@dataclass(frozen=True)
class ReadFiles:
    """What came of a message's attachments: the files read, notes for the person, the
    images decoded (for a backend that takes them) and the names of all the images
    attached (read or not: the message's placeholders)."""

    files: tuple[FileText, ...] = ()
    notes: tuple[str, ...] = ()
    images: tuple[ImageInput, ...] = ()
    image_names: tuple[str, ...] = ()


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
    images: ImageLimits | None = None,
) -> ReadFiles:
    """Download and decode the text files among `refs`, and with `images` (a backend
    that takes them) the images, concurrently.

    `where` names the conversation in log lines about failed downloads.
    """
    if not refs:
        return ReadFiles()
    if images is not None and (images.max_count <= 0 or images.max_bytes <= 0):
        images = None
    texts = [r for r in refs if is_text(r)]
    pictures = [r for r in refs if not is_text(r) and looks_like_image(r.content_type, r.name)]
    names = tuple(display_name(r) for r in pictures)
    if max_bytes <= 0 and images is None:
        return ReadFiles(notes=(NOT_READING,), image_names=names)
    binary = [
        display_name(r)
        for r in refs
        if not is_text(r) and not looks_like_image(r.content_type, r.name)
    ]
    not_read: list[str] = []  # text files, with ATTACHMENT_MAX_BYTES=0
    if max_bytes <= 0:
        not_read, texts = [display_name(r) for r in texts], []
    too_big = [display_name(r) for r in texts if r.size > max_bytes]
    wanted = [r for r in texts if r.size <= max_bytes]
    other_kinds: list[str] = []  # images of a kind not decoded (bmp, heic…)
    too_many: list[str] = []
    big_images: list[str] = []
    wanted_images: list[FileRef] = []
    if images is None:
        binary += names
    else:
        supported = []
        for ref in pictures:
            if is_supported(ref.content_type, ref.name):
                supported.append(ref)
            else:
                other_kinds.append(display_name(ref))
        big_images = [display_name(r) for r in supported if r.size > images.max_bytes]
        supported = [r for r in supported if r.size <= images.max_bytes]
        too_many = [display_name(r) for r in supported[images.max_count :]]
        wanted_images = supported[: images.max_count]

    async def one(ref: FileRef, limit: int) -> bytes | None:
        try:
            return await asyncio.wait_for(fetch(ref, limit), seconds_each)
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

    image_bytes = images.max_bytes if images is not None else 0
    got = await asyncio.gather(
        *(one(r, max_bytes) for r in wanted), *(one(r, image_bytes) for r in wanted_images)
    )
    files: list[FileText] = []
    failed: list[str] = []
    for ref, data in zip(wanted, got[: len(wanted)], strict=True):
        if data is None:
            failed.append(display_name(ref))
        elif len(data) > max_bytes:
            too_big.append(display_name(ref))  # its declared size was wrong
        else:
            files.append(FileText(display_name(ref), decode(data)))
    decoded: list[ImageInput] = []
    unreadable: list[str] = []
    bombs: list[str] = []
    if images is not None:
        limits = images
        results = await asyncio.gather(
            *(
                _decoded(ref, data, limits)
                for ref, data in zip(wanted_images, got[len(wanted) :], strict=True)
            )
        )
        lists = {"failed": failed, "big": big_images, "bomb": bombs, "broken": unreadable}
        for ref, result in zip(wanted_images, results, strict=True):
            if isinstance(result, ImageInput):
                decoded.append(result)
            else:
                lists[result].append(display_name(ref))
    notes = []
    if binary:
        kinds = "text files and images" if images is not None else "text files"
        notes.append(f"(I read {kinds} only, so I skipped {_listing(binary)}.)")
    if not_read:
        notes.append(f"(I don't read attached text files here, so I skipped {_listing(not_read)}.)")
    if other_kinds:
        notes.append(
            "(I look at png, jpeg, webp and gif images only, so I skipped "
            f"{_listing(other_kinds)}.)"
        )
    if too_many and images is not None:
        notes.append(
            f"(I look at up to {images.max_count} image{'s' if images.max_count > 1 else ''} "
            "a message, so I skipped "
            f"{_listing(too_many)}.)"
        )
    if too_big:
        notes.append(f"(I skipped {_listing(too_big)}: I read files of up to {max_bytes:,} bytes.)")
    if big_images and images is not None:
        notes.append(
            f"(I skipped {_listing(big_images)}: I look at images of up to "
            f"{images.max_bytes:,} bytes.)"
        )
    if bombs:
        notes.append(f"(I skipped {_listing(bombs)}: too many pixels for me to look at.)")
    if unreadable:
        it = "it" if len(unreadable) == 1 else "them"
        notes.append(
            f"(I couldn't read {_listing(unreadable)} as an image, so I answered without {it}.)"
        )
    if failed:
        it = "it" if len(failed) == 1 else "them"
        notes.append(f"(I couldn't download {_listing(failed)}, so I answered without {it}.)")
    return ReadFiles(tuple(files), tuple(notes), tuple(decoded), names)


async def _decoded(ref: FileRef, data: bytes | None, limits: ImageLimits) -> ImageInput | str:
    """A downloaded image decoded (on a worker thread: decoding is CPU work), or why
    not: "failed" (no download), "big" (over its cap), "bomb" or "broken"."""
    if data is None:
        return "failed"
    if len(data) > limits.max_bytes:
        return "big"  # its declared size was wrong
    try:
        return await asyncio.to_thread(
            decode_image, display_name(ref), data, max_side=limits.max_side
        )
    except ImageError as exc:
        log.info("Attachment %r: not used as an image (%s)", display_name(ref), exc)
        return "bomb" if exc.bomb else "broken"
