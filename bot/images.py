"""Images attached to a message, decoded for a vision model: pure, no I/O.

`decode_image` reads png, jpeg, webp and gif (its first frame) with Pillow, refuses a
decompression bomb from its header before any pixel is decoded, converts it to RGB and
scales it down to a bound. What comes out (`ImageInput`) is re-encoded bytes with the
file's name: what a backend sends a server, or opens again for a local processor.
Image bytes are never stored: memory keeps only `placeholder(name)`.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image, UnidentifiedImageError

# Pixels an image may declare at most (a 8,000 x 5,000 picture): checked on the header,
# before decoding. Pillow's own guard (a warning past MAX_IMAGE_PIXELS, an error past
# twice that) is lowered to the same bound, for whatever path reaches a decode.
MAX_PIXELS = 40_000_000
Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or MAX_PIXELS, MAX_PIXELS)

# What the bot reads, by content type and by extension (for a platform that says
# application/octet-stream or nothing).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"})
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "jpe", "webp", "gif"})
# Other pictures: recognised as images (a note says which kinds are read), never decoded.
OTHER_IMAGE_EXTENSIONS = frozenset({"bmp", "tif", "tiff", "heic", "heif", "avif", "ico", "jxl"})
JPEG_QUALITY = 90
# The longest an image may be against its width (or the other way round) as it reaches
# a model: a long screenshot (1080 x 8000) is within it; a thin strip gets white bands.
MAX_ASPECT = 8


class ImageError(ValueError):
    """An image that cannot be used: `bomb` when it declares too many pixels."""

    def __init__(self, why: str, *, bomb: bool = False) -> None:
        super().__init__(why)
        self.bomb = bomb


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One decoded image, ready for a model: RGB, within the size bound, re-encoded."""

    name: str
    data: bytes
    mime: str  # image/png or image/jpeg
    width: int
    height: int

    def data_url(self) -> str:
        """The image as a `data:` URL (OpenAI's `image_url` content part)."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def pil(self) -> Image.Image:
        """The image as a PIL image (for a local processor)."""
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


def placeholder(name: str) -> str:
    """What memory and the prompt's text keep of an image: its name only."""
    return f"[image: {name}]"


def _kind(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def _extension(name: str) -> str:
    return PurePosixPath(name.lower()).suffix.lstrip(".")


def looks_like_image(content_type: str, name: str) -> bool:
    """A picture, read or not: an image content type, else an image extension."""
    kind = _kind(content_type)
    if kind.startswith("image/"):
        return True
    if kind and kind != "application/octet-stream":
        return False
    return _extension(name) in IMAGE_EXTENSIONS | OTHER_IMAGE_EXTENSIONS


def is_supported(content_type: str, name: str) -> bool:
    """An image the bot decodes (png, jpeg, webp, gif), by content type or extension."""
    kind = _kind(content_type)
    if kind in IMAGE_TYPES:
        return True
    if kind and kind != "application/octet-stream":
        return False  # another image type (bmp, heic…), or not an image
    return _extension(name) in IMAGE_EXTENSIONS


def decode_image(
    name: str, data: bytes, *, max_side: int = 1536, max_pixels: int = MAX_PIXELS
) -> ImageInput:
    """`data` as an RGB image at most `max_side` pixels wide and high; ImageError for a
    file that is not a png, jpeg, webp or gif, a broken or truncated one, or one that
    declares more than `max_pixels` pixels (refused before it is decoded)."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            # The header only so far: its declared size decides before any decoding.
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise ImageError(f"declares {width} x {height} pixels", bomb=True)
            source = image.format
            image.seek(0)  # a gif's first frame
            image.draft("RGB", (max_side, max_side))  # jpeg: decode at a reduced scale
            rgb = _rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard
        raise ImageError(str(exc), bomb=True) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not a png, jpeg, webp or gif image") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"broken image ({type(exc).__name__})") from exc
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    rgb = _letterbox(rgb)
    out = io.BytesIO()
    if source == "JPEG":
        rgb.save(out, "JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    else:
        rgb.save(out, "PNG", optimize=False)
        mime = "image/png"
    return ImageInput(name, out.getvalue(), mime, rgb.width, rgb.height)


def _letterbox(image: Image.Image) -> Image.Image:
    """An image longer than `MAX_ASPECT` times its width (or the other way round) on a
    white band that brings it to that ratio: processors scale the short side up to
    their size (a 1 x 1536 strip became 336 x 516,096 pixels, seconds of work and GBs),
    and some refuse such ratios outright."""
    width, height = image.size
    short = -(-max(width, height) // MAX_ASPECT)  # ceiling
    if min(width, height) >= short:
        return image
    size = (short, height) if width < height else (width, short)
    band = Image.new("RGB", size, (255, 255, 255))
    band.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return band


def _rgb(image: Image.Image) -> Image.Image:
    """The image decoded as RGB; transparent parts on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
