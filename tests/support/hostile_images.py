"""Image files a hostile or unlucky user may send, built in memory: decompression bombs, huge-but-tiny PNGs,
corrupt and truncated files, 16-bit copies of 8-bit images, and the 12-megapixel JPEG a phone takes. Shared by
the service tests and the flood benchmark (benchmarks/service_flood.py)."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels but whose data is a few bytes (a bomb header)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + _chunk(b"IEND", b"")
    )


@functools.cache
def photo_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A real, fully decodable JPEG of a phone photo's size (4000x3000: 12 megapixels), smooth so it stays
    small (about 260 KB); built once per size."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    return _save(image, "JPEG")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height pixels (at most 65535 each), its data
    that of a 64x64 image: a JPEG bomb header."""
    data = bytearray(_save(Image.new("RGB", (64, 64), (90, 120, 200)), "JPEG"))
    sof = data.find(b"\xff\xc0")  # baseline frame: length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def blank_png(width: int, height: int) -> bytes:
    """A real, fully decodable black PNG: a 6300x6300 one is about 115 KB but 40 megapixels to decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def noisy_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random pixels: incompressible, so as costly to decode as its size allows."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 (H, W) gray or (H, W, 3) RGB samples (Pillow cannot write 16-bit RGB)."""
    height, width = samples.shape[:2]
    color_type = 0 if samples.ndim == 2 else 2
    raw = b"".join(b"\0" + samples[row].astype(">u2").tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def sixteen_bit_copies(rgb: np.ndarray) -> dict[str, tuple[bytes, bytes]]:
    """name -> (a 16-bit file, the 8-bit file with the same picture) for a uint8 (H, W, 3) image.

    Each 16-bit sample is the 8-bit one times 257 (0 -> 0, 255 -> 65535), as image tools widen 8 to 16 bits;
    the gray copies come from the image's luminance. Pillow opens them in modes I;16, I;16B, I and RGB.
    """
    gray8 = np.asarray(Image.fromarray(rgb).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257
    gray_png8 = _save(Image.fromarray(gray8), "PNG")
    return {
        "16-bit gray PNG (mode I;16)": (_save(Image.fromarray(gray16), "PNG"), gray_png8),
        "16-bit big-endian gray TIFF (mode I;16B)": (
            _save(Image.fromarray(gray16.astype(">u2")), "TIFF"),
            gray_png8,
        ),
        "32-bit integer gray TIFF holding 16-bit values (mode I)": (
            _save(Image.fromarray(gray16.astype(np.int32)), "TIFF"),
            gray_png8,
        ),
        "16-bit RGB PNG": (png16(rgb.astype(np.uint16) * 257), _save(Image.fromarray(rgb), "PNG")),
    }


def corrupt_payloads(valid_png: bytes) -> dict[str, bytes]:
    """name -> bytes that are not a decodable image, made from a valid PNG (at least a few hundred bytes)."""
    rng = np.random.default_rng(0)
    jpeg = _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    body = bytearray(valid_png)
    idat = body.find(b"IDAT")
    garbled = bytes(body[: idat + 8]) + bytes(rng.integers(0, 256, len(body) - idat - 8, dtype=np.uint8))
    return {
        "random bytes": bytes(rng.integers(0, 256, 4096, dtype=np.uint8)),
        "text named .png": b"hello, world: this is not an image\n",
        "PNG signature then zeros": b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
        "PNG cut after its header": valid_png[:60],
        "PNG cut in its pixel data": valid_png[: len(valid_png) // 2],
        "PNG with garbled pixel data": garbled,
        "JPEG cut in half": jpeg[: len(jpeg) // 2],
        "GIF signature only": b"GIF89a",
    }
