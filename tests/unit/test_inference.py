"""The shared inference path: image decoding for any input, TTA, temperature, input validation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cifar10_pipeline.core.images import (
    ImageInputError,
    ImageTooLargeError,
    decode_image,
    image_to_array,
    inspect_image,
)
from cifar10_pipeline.modeling.inference import (
    fit_temperature,
    normalize,
    predict_logits,
    set_calibration_temperature,
    tta_logits,
)

from ..conftest import synthetic_images
from ..support.helpers import tiny_convnet
from ..support.hostile_images import jpeg_declaring, photo_jpeg


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_32px_png_passes_through_untouched() -> None:
    images, _ = synthetic_images(1, seed=0)
    np.testing.assert_array_equal(image_to_array(_encode(Image.fromarray(images[0]), "PNG")), images[0])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_any_mode_and_size_becomes_32x32_rgb(mode: str) -> None:
    image = Image.new("RGB", (120, 70), (200, 30, 60)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    array = image_to_array(_encode(image, fmt))
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (64, 32))
    image.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    array = image_to_array(buffer.getvalue())
    assert array[2, 16, 0] > 200 and array[29, 16, 0] < 60  # red is now on top


@pytest.mark.parametrize("payload", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_bytes_raise_a_clear_error(payload: bytes) -> None:
    with pytest.raises(ImageInputError, match="not a readable image"):
        image_to_array(payload)


def test_truncated_image_is_rejected() -> None:
    data = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(ImageInputError):
        image_to_array(data[: len(data) // 2])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        image_to_array(tmp_path / "nope.png")


def test_normalize_layout_and_values() -> None:
    images = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    x = normalize(images, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, 2.0))


@pytest.mark.slow
def test_tta_mirror_level_is_flip_invariant() -> None:
    model = tiny_convnet()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            tta_logits(model, x, 1), tta_logits(model, x.flip(-1), 1), atol=1e-5, rtol=1e-5
        )
        assert tta_logits(model, x, 2).shape == (3, 10)


def test_predict_logits_validates_its_input() -> None:
    model = tiny_convnet()
    with pytest.raises(ImageInputError, match=r"\(N, 32, 32, 3\)"):
        predict_logits(model, np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(ImageInputError):
        predict_logits(model, np.zeros((2, 32, 32, 3), np.float32))


def test_temperature_is_recovered_and_applied() -> None:
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 3
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=generator).squeeze(1)
    assert fit_temperature(true_logits * 2.5, labels) == pytest.approx(2.5, rel=0.1)

    model = tiny_convnet()
    images, _ = synthetic_images(4, seed=0)
    raw = predict_logits(model, images, precision="fp32", calibrated=False)
    set_calibration_temperature(model, 2.0)
    torch.testing.assert_close(predict_logits(model, images, precision="fp32"), raw / 2.0)
    assert torch.equal(raw.argmax(1), predict_logits(model, images, precision="fp32").argmax(1))


def test_cross_entropy_of_calibrated_logits_is_not_worse() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2000, 10, generator=generator)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    t = fit_temperature(logits * 0.3, labels)
    assert F.cross_entropy(logits * 0.3 / t, labels) <= F.cross_entropy(logits * 0.3, labels) + 1e-6


@pytest.mark.parametrize(
    ("flags", "native"),
    [("fpu sse2 avx2 fma", False), ("avx2 avx512f avx512bw", False), ("avx512f avx512_bf16", True),
     ("avx2 amx_bf16 amx_tile", True)],
)  # fmt: skip
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(tmp_path: Path, flags: str, native: bool) -> None:
    from cifar10_pipeline.modeling.inference import native_bf16, resolve_precision

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert native_bf16(torch.device("cpu"), cpuinfo) is native
    # Explicit choices are kept whatever the hardware.
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")


def test_a_12_megapixel_jpeg_is_decoded_at_reduced_scale() -> None:
    """A phone photo is accepted, and decoded by libjpeg at 1/8 scale (500x375), not at 4000x3000: the
    cost of a decode is bounded by draft mode, not by the photo's size."""
    photo = photo_jpeg(4000, 3000)
    header = inspect_image(photo)
    assert (header.width, header.height, header.format) == (4000, 3000, "JPEG")
    assert (header.decode_width, header.decode_height) == (500, 375)
    assert decode_image(photo).size == (500, 375)  # what was really decoded
    array = image_to_array(photo)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    # The same picture decoded at full size and resized gives (almost) the same 32x32 image.
    full = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    assert np.abs(array.astype(int) - full.astype(int)).max() <= 3


def test_a_png_is_decoded_at_full_size() -> None:
    header = inspect_image(_encode(Image.new("RGB", (640, 480)), "PNG"))
    assert (header.decode_width, header.decode_height) == (640, 480)


def test_a_jpeg_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(ImageTooLargeError, match=r"3600000000 pixels, above the limit of"):
        inspect_image(jpeg_declaring(60_000, 60_000))
    with pytest.raises(ImageTooLargeError, match=r"above the limit of 1000 pixels"):
        image_to_array(photo_jpeg(4000, 3000), max_pixels=1000)
