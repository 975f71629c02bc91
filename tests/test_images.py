"""Decoding attached images (bot.images): real small images made by Pillow here, a
decompression bomb, broken and disguised files."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from bot.images import (
    ImageError,
    decode_image,
    is_supported,
    looks_like_image,
    placeholder,
)


def picture(fmt: str, size: tuple[int, int] = (40, 30), mode: str = "RGB", **save: object) -> bytes:
    image = Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30))
    out = io.BytesIO()
    image.save(out, fmt, **save)
    return out.getvalue()


def gif_with_two_frames() -> bytes:
    frames = [Image.new("P", (20, 10), 1), Image.new("P", (20, 10), 2)]
    frames[0].putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    frames[1].putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (a decompression
    bomb: its few bytes of data would inflate to gigabytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_format_decodes_to_rgb(fmt: str) -> None:
    image = decode_image(f"shot.{fmt.lower()}", picture(fmt))
    assert (image.name, image.width, image.height) == (f"shot.{fmt.lower()}", 40, 30)
    assert image.mime == ("image/jpeg" if fmt == "JPEG" else "image/png")
    decoded = image.pil()
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    red, green, _ = decoded.getpixel((5, 5))  # type: ignore[misc]
    assert red > 150 and green < 80


def test_a_gif_gives_its_first_frame() -> None:
    image = decode_image("anim.gif", gif_with_two_frames()).pil()
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_transparency_lands_on_white() -> None:
    image = decode_image("alpha.png", picture("PNG", mode="RGBA")).pil()
    red, green, blue = image.getpixel((0, 0))  # type: ignore[misc]
    assert red > 200 and 120 < green < 150 and 120 < blue < 150  # half red over white


def test_a_big_picture_is_scaled_down_within_the_bound() -> None:
    image = decode_image("wide.png", picture("PNG", size=(3000, 1000)), max_side=600)
    assert (image.width, image.height) == (600, 200)
    assert image.pil().size == (600, 200)
    assert image.data_url().startswith("data:image/png;base64,")
    assert base64.b64decode(image.data_url().split(",", 1)[1]) == image.data


@pytest.mark.parametrize(("size", "expected"), [((1, 1536), (192, 1536)), ((900, 2), (900, 113))])
def test_a_thin_strip_reaches_the_model_on_white_bands(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    """A 93-byte 1 x 1536 PNG would be scaled up by a processor to hundreds of
    thousands of pixels along its length: it goes on white bands, at most 8:1."""
    image = decode_image("strip.png", picture("PNG", size=size))
    assert (image.width, image.height) == expected
    with Image.open(io.BytesIO(image.data)) as shown:
        assert shown.getpixel((0, 0)) == (255, 255, 255)
    long_shot = decode_image("chat.png", picture("PNG", size=(180, 1400)))
    assert (long_shot.width, long_shot.height) == (180, 1400)  # within 8:1: as it was


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = png_declaring(50_000, 50_000)
    assert len(bomb) < 200
    with pytest.raises(ImageError) as caught:
        decode_image("bomb.png", bomb)
    assert caught.value.bomb


def test_the_pixel_cap_is_checked_before_decoding() -> None:
    # Under Pillow's own guard, over the bot's: refused on the header alone, so even
    # a file with no pixel data at all is a bomb, not a broken image.
    with pytest.raises(ImageError) as caught:
        decode_image("big.png", png_declaring(2000, 2000), max_pixels=1_000_000)
    assert caught.value.bomb
    with pytest.raises(ImageError) as small:
        decode_image("small.png", picture("PNG", size=(20, 20)), max_pixels=100)
    assert small.value.bomb


def test_truncated_and_disguised_files_are_errors() -> None:
    whole = picture("PNG", size=(200, 200))
    with pytest.raises(ImageError) as truncated:
        decode_image("cut.png", whole[: len(whole) // 2])
    assert not truncated.value.bomb
    with pytest.raises(ImageError):
        decode_image("notes.png", b"just some text, not a picture at all")
    with pytest.raises(ImageError):  # a real image of a kind not read
        decode_image("old.png", picture("BMP"))


@pytest.mark.parametrize(
    ("content_type", "name", "image", "supported"),
    [
        ("image/png", "a.png", True, True),
        ("image/jpeg", "photo", True, True),
        ("image/webp; charset=binary", "x", True, True),
        ("image/gif", "x.gif", True, True),
        ("", "screenshot.PNG", True, True),
        ("application/octet-stream", "a.jpeg", True, True),
        ("image/bmp", "a.bmp", True, False),
        ("", "scan.tiff", True, False),
        ("image/heic", "IMG_1.HEIC", True, False),
        ("text/plain", "a.png", False, False),
        ("application/pdf", "doc.pdf", False, False),
    ],
)
def test_which_files_are_images(content_type: str, name: str, image: bool, supported: bool) -> None:
    assert looks_like_image(content_type, name) is image
    assert is_supported(content_type, name) is supported


def test_memory_keeps_a_placeholder() -> None:
    assert placeholder("screenshot.png") == "[image: screenshot.png]"
