"""Untrusted image bytes -> the network's 32x32 RGB uint8 arrays: header inspection, pixel limits, decoding.

The one decoder of every entry point (the CLI, the web service, evaluation of user files, the saved image
processor), so a file is accepted, refused and resized the same way everywhere, in the same words. It
imports only Pillow, numpy and the standard library: the web service's guards import it at startup without
paying for torch or transformers.

The cost of a decode is bounded before it starts, from the header alone: an image declaring more than the
caller's ``max_pixels`` is refused (the decompression-bomb guard). JPEGs, what cameras and phones write, are
decoded at reduced scale by libjpeg's DCT scaling (Pillow's draft mode, 1/2, 1/4 or 1/8 toward 32x32): a
12-megapixel photo costs a 500x375 decode. Other formats decode at full size; the web service bounds them
by its per-request pixel budget, counted in the pixels a decode really produces (``ImageHeader``).
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar10_pipeline import IMAGE_SHAPE

# The ceiling every decode in the package obeys, as declared in the header: a 200-megapixel phone photo
# (16320x12240) fits. image_to_array refuses above ``max_pixels`` (by default this) itself, from the header,
# before decoding, with a message that states the limit the caller set; Pillow's own bomb guard, which
# refuses above twice MAX_IMAGE_PIXELS at open, is the backstop. The web service sets its own limit
# (ServeSettings.max_image_pixels), which may not exceed this one.
MAX_IMAGE_PIXELS = 200_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
OUTPUT_SIZE = (IMAGE_SHAPE[1], IMAGE_SHAPE[0])  # (width, height) of what the network sees

# Words shared by every entry point (the CLI and the web service say the same thing about the same file).
EMPTY_FILE = "not a readable image: the file is empty (0 bytes); choose an image file"
UNKNOWN_FORMAT = (
    "not a readable image: its bytes are in no image format Pillow reads; upload PNG, JPEG, WebP, BMP, GIF "
    "or TIFF"
)
# Pillow's messages sometimes embed the repr of the file object (<_io.BytesIO object at 0x7f...>).
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# What Pillow raises for input it cannot decode (a DecompressionBombError is none of the others).
DECODE_ERRORS = (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError, SyntaxError)
# Pillow modes holding 16-bit samples; "I" (32-bit integers) is where Pillow puts 16-bit data it widens.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageInputError(ValueError):
    """An input is not an image Pillow can decode, or is too large to decode safely."""


class ImageTooLargeError(ImageInputError):
    """An image declares more pixels than the caller's limit (a possible decompression bomb)."""


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    width: int  # as declared
    height: int
    format: str | None  # Pillow's name: "JPEG", "PNG", ...
    decode_width: int  # what a decode produces: smaller than declared for a JPEG decoded at reduced scale
    decode_height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_pixels(self) -> int:
        """The pixels a decode really produces, the measure of its CPU and memory."""
        return self.decode_width * self.decode_height


def too_large_message(declared: str, max_pixels: int) -> str:
    return (
        f"image is too large to decode safely: {declared}, above the limit of {max_pixels} pixels; "
        "downscale it first (the model sees 32x32 anyway)"
    )


def _decode_failure(exc: BaseException, max_pixels: int) -> ImageInputError:
    """Pillow's exception for an undecodable input -> an ImageInputError with a clean message."""
    if isinstance(exc, Image.DecompressionBombError):
        # Raised by Pillow's own guard at open, before the size is known to us; its message has the count.
        match = _BOMB_PIXELS.search(str(exc))
        declared = f"{match[1]} pixels" if match else "it declares more pixels than Pillow allows"
        return ImageTooLargeError(too_large_message(declared, max_pixels))
    if isinstance(exc, UnidentifiedImageError):
        return ImageInputError(UNKNOWN_FORMAT)
    reason = _OBJECT_REPR.sub("", str(exc)).strip(" :;,") or type(exc).__name__
    return ImageInputError(
        f"not a readable image: the file is corrupt or truncated ({reason}); save or download it again"
    )


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Open image bytes (header only), refuse them if empty or above ``max_pixels``, and set a JPEG to
    decode at the smallest DCT scale that still covers OUTPUT_SIZE. Returns (image, declared size).

    Not closed by the caller: it reads from memory (no file handle to release), and closing would discard
    the decoded pixels, which are then used without a copy."""
    if not data:
        raise ImageInputError(EMPTY_FILE)
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(too_large_message(f"{width}x{height} = {width * height} pixels", max_pixels))
    # Draft mode changes only how a JPEG will be decoded (a no-op for other formats): after it, image.size
    # is the reduced size the decode produces. Never below OUTPUT_SIZE, so the final antialiased bicubic
    # resize still does the last step, as for every other image.
    image.draft("RGB", OUTPUT_SIZE)
    return image, (width, height)


def _located(exc: ImageInputError, where: str) -> ImageInputError:
    return type(exc)(f"{where}: {exc}")


def _read(source: str | Path | bytes) -> tuple[str, bytes]:
    # A path is read here, so that a missing, unreadable or folder path raises its own OSError (the caller
    # says "no such file" or "permission denied"), never a decoding message.
    if isinstance(source, bytes):
        return "image bytes", source
    return str(source), Path(source).read_bytes()


def inspect_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageHeader:
    """The header of an image, without decoding its pixels; the same checks and errors as
    ``image_to_array`` except those only decoding can find (a truncated or corrupt pixel stream)."""
    where, data = _read(source)
    try:
        image, (width, height) = _open_checked(data, max_pixels)
        return ImageHeader(width, height, image.format, *image.size)
    except ImageInputError as exc:
        raise _located(exc, where) from None
    except DECODE_ERRORS as exc:
        raise _located(_decode_failure(exc, max_pixels), where) from None


def decode_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image (a JPEG at reduced scale, see the module's docstring), EXIF rotation applied, as
    8-bit RGB; not yet resized. Raises as ``image_to_array`` does."""
    where, data = _read(source)
    try:
        image, _ = _open_checked(data, max_pixels)
        image.load()
        # Phone photos store their rotation in EXIF; apply it so the model sees the upright scene. Done
        # here, inside the error handling (a damaged file can fail in either step). In place and with no
        # copy of an RGB image: a full-size decode (a PNG) holds its pixels about once, not four times.
        ImageOps.exif_transpose(image, in_place=True)
        return image if image.mode == "RGB" else to_rgb(image)
    except ImageInputError as exc:
        raise _located(exc, where) from None
    except DECODE_ERRORS as exc:
        raise _located(_decode_failure(exc, max_pixels), where) from None


def image_to_array(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode any image Pillow reads and bring it to the network's 32x32 RGB uint8 form.

    Images already 32x32 pass through untouched (the training data); any other size is resized with
    Pillow's antialiased bicubic filter, the same way for every caller, a JPEG from the reduced scale it
    was decoded at. 16-bit images are scaled to 8 bits. Raises ImageInputError (ImageTooLargeError above
    ``max_pixels``), its message prefixed with the path or "image bytes"; OSError for a path that cannot
    be read.
    """
    return _resized(decode_image(source, max_pixels))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, 16-bit images scaled from 0..65535 to 0..255.

    Pillow's own ``convert`` clips 16-bit samples to 255 (a 16-bit photo turns white). 16-bit RGB(A) PNGs
    already open as 8-bit RGB(A) (Pillow keeps the high byte). Mode "I" holds 16-bit data when Pillow widens
    it, but also 8-bit values converted to it: it is scaled only if a sample exceeds 255.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if image.mode != "I" or values.max(initial=0) > 255:
            values = (np.clip(values, 0, 65535) * 255 + 32767) // 65535
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> the network's 32x32 RGB uint8 form (EXIF rotation applied, bicubic resize).

    Shared by ``image_to_array`` and the saved image processor, so every entry point resizes the same way.
    """
    return _resized(to_rgb(ImageOps.exif_transpose(image)))


def _resized(rgb: Image.Image) -> np.ndarray:
    if rgb.size != OUTPUT_SIZE:
        rgb = rgb.resize(OUTPUT_SIZE, Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)
