"""One image at a time: every quarantine reason, every conversion, the resize rule and kept bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import process_image, target_size
from pipeline.manifest import Reason, Rejected
from tests.pipeline.conftest import (
    FLOWERS,
    jpeg_bytes,
    left_red_right_blue,
    palette_png_with_transparency,
    png_bytes,
    rotated_jpeg,
    sixteen_bit_png,
)

DEFAULTS = {
    "max_size": None,
    "quality": 90,
    "max_pixels": 10_000_000,
    "keep_formats": frozenset({"jpeg", "png", "webp"}),
}
PHOTO = sorted((FLOWERS / "train" / "05_iris").iterdir())[0]


def process(data: bytes, **overrides):
    return process_image(data, **{**DEFAULTS, **overrides})


def decoded(result) -> np.ndarray:
    image = Image.open(io.BytesIO(result.data))
    assert image.mode == "RGB"
    return np.asarray(image)


@pytest.mark.parametrize(
    "size, max_size, expected",
    [
        ((500, 689), 256, (256, 353)),
        ((689, 500), 256, (353, 256)),
        ((500, 689), 500, None),  # exactly at the bound: untouched
        ((32, 32), 256, None),  # never upscaled
        ((5000, 10), 4, (2000, 4)),
        ((500, 689), None, None),
    ],
)
def test_target_size_keeps_aspect_and_never_upscales(size, max_size, expected):
    assert target_size(*size, max_size) == expected


def test_a_photo_within_bounds_keeps_its_original_bytes():
    data = PHOTO.read_bytes()
    result = process(data)
    assert result.kept_original and result.data == data and result.extension == "jpg"
    assert (result.width, result.height) == Image.open(PHOTO).size


def test_resizing_takes_the_shorter_side_to_max_size_and_reencodes():
    result = process(PHOTO.read_bytes(), max_size=128)
    original = Image.open(PHOTO).size
    stored = Image.open(io.BytesIO(result.data))
    assert not result.kept_original and stored.format == "JPEG"
    assert min(stored.size) == 128 and (result.width, result.height) == original
    assert abs(stored.size[0] / stored.size[1] - original[0] / original[1]) < 0.01


def test_draft_path_for_big_downscales_matches_the_full_decode():
    # 500 px -> 64 px: PIL decodes at 1/4 scale in the DCT; the picture must be the same one.
    data = PHOTO.read_bytes()
    small = decoded(process(data, max_size=64)).astype(float)
    full = np.asarray(Image.open(PHOTO).convert("RGB").resize((small.shape[1], small.shape[0]), Image.BICUBIC)).astype(
        float
    )
    assert small.shape == full.shape
    assert np.abs(small - full).mean() < 6  # JPEG round trip and filter differences only


def test_bilinear_and_bicubic_give_the_same_size():
    data = PHOTO.read_bytes()
    a, b = process(data, max_size=200, resample="bilinear"), process(data, max_size=200)
    assert Image.open(io.BytesIO(a.data)).size == Image.open(io.BytesIO(b.data)).size


def test_exif_orientation_is_applied():
    result = process(rotated_jpeg())
    pixels = decoded(result)
    # Stored 60x40 with red on the left; orientation 6 shows it rotated clockwise: 40x60, red on top.
    assert (result.width, result.height) == (40, 60) and pixels.shape == (60, 40, 3)
    assert not result.kept_original
    top, bottom = pixels[:25].mean(axis=(0, 1)), pixels[-25:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_exif_orientation_is_applied_on_the_pil_path_too():
    # A big downscale goes through PIL draft; orientation must survive it. 600x400 stored -> 400x600 shown.
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg_bytes(left_red_right_blue(600, 400), exif=exif.tobytes())
    result = process(data, max_size=100)
    pixels = decoded(result)
    assert (result.width, result.height) == (400, 600) and pixels.shape == (150, 100, 3)
    assert pixels[:60].mean(axis=(0, 1))[0] > 200


def test_cmyk_jpeg_becomes_rgb_with_the_same_picture():
    original = Image.open(PHOTO).convert("RGB")
    result = process(jpeg_bytes(original.convert("CMYK")))
    assert not result.kept_original and result.extension == "jpg"
    assert np.abs(decoded(result).astype(float) - np.asarray(original, float)).mean() < 8


def test_sixteen_bit_png_is_scaled_not_clipped():
    pixels = decoded(process(sixteen_bit_png()))
    assert abs(pixels.mean() - 40000 / 257) < 3  # ~156, not 255


def test_palette_transparency_is_composited_over_white():
    pixels = decoded(process(palette_png_with_transparency()))
    assert pixels[:, :15].min() > 240  # transparent half: white
    green = pixels[:, 25:].mean(axis=(0, 1))
    assert green[1] > 200 and green[0] < 60 and green[2] < 60


def test_grayscale_and_rgba_become_rgb():
    assert decoded(process(png_bytes(Image.new("L", (10, 10), 128)))).shape == (10, 10, 3)
    assert decoded(process(png_bytes(Image.new("RGBA", (10, 10), (0, 0, 0, 0))))).min() > 240


def test_plain_rgb_png_and_webp_keep_their_encoding():
    png = png_bytes(left_red_right_blue())
    assert process(png).data == png and process(png).extension == "png"
    buffer = io.BytesIO()
    left_red_right_blue().save(buffer, "WEBP", lossless=True)
    webp = process(buffer.getvalue())
    assert webp.kept_original and webp.extension == "webp"
    # Not in keep_formats: re-encoded as JPEG.
    assert process(png, keep_formats=frozenset({"jpeg"})).extension == "jpg"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", Reason.EMPTY),
        (b"hello, I am text\n", Reason.NOT_AN_IMAGE),
        (PHOTO.read_bytes()[:5000], Reason.TRUNCATED),
        (png_bytes(left_red_right_blue())[:60], Reason.TRUNCATED),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 64, Reason.UNDECODABLE),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png", "garbage-after-jpeg-magic"],
)
def test_bad_inputs_are_rejected_with_their_reason(data, reason):
    with pytest.raises(Rejected) as caught:
        process(data)
    assert caught.value.reason == reason, caught.value.detail


def test_too_many_pixels_is_checked_from_the_header():
    with pytest.raises(Rejected) as caught:
        process(png_bytes(Image.new("RGB", (2000, 2000))), max_pixels=1_000_000)
    assert caught.value.reason == Reason.TOO_MANY_PIXELS and "2000x2000" in caught.value.detail
