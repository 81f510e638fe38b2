"""One image's bytes in, the bytes to store out: decode, orient, convert to RGB, resize, encode.

Paths, fastest first (figures in ``docs/BENCHMARKS.md``):

- JPEG, no big downscale: libjpeg-turbo through ``torchvision.io.decode_jpeg`` (it also converts
  grayscale and CMYK and applies EXIF orientation), a torch antialiased bicubic resize, and
  ``torchvision.io.encode_jpeg``. About 2-2.5x PIL's full decode + bicubic resize + encode per core.
- JPEG at least 2x larger than the target: PIL with ``draft``, which has libjpeg decode at 1/2, 1/4 or
  1/8 scale in the DCT (far less work than a full decode), then the same torch resize and encoder.
- Every other format: PIL decode, then the same tail.

Images already within bounds, in a kept format, plain 8-bit RGB and upright keep their original
bytes; they are still decoded in full once, so a truncated or corrupt file never reaches a shard.
Every failure is an :class:`Rejected` with a :class:`~pipeline.manifest.Reason`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pipeline.manifest import Reason, Rejected

# PIL format name -> file extension of a kept original in a shard (the real encoding, so readers pick
# the right decoder).
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# EXIF orientations 5-8 rotate by 90 degrees: the displayed width and height are swapped.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_FILTERS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_EXIF_ORIENTATION_TAG = 0x0112
# Leading bytes of formats PIL can open: a file that starts like one but will not open is damaged,
# a file that starts like none is not an image at all.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    extension: str  # without the dot: "jpg", "png", ...
    width: int  # of the original image, upright (after EXIF orientation)
    height: int
    kept_original: bool


def target_size(width: int, height: int, max_size: int | None) -> tuple[int, int] | None:
    """(width, height) with the shorter side at ``max_size`` and the aspect kept; None if no resize is due.

    Never upscales: an image whose shorter side is already at most ``max_size`` is left alone.
    """
    if max_size is None or min(width, height) <= max_size:
        return None
    scale = max_size / min(width, height)
    if width <= height:
        return max_size, max(1, round(height * scale))
    return max(1, round(width * scale)), max_size


def process_image(
    data: bytes,
    *,
    max_size: int | None,
    quality: int,
    max_pixels: int,
    keep_formats: frozenset[str],
    resample: str = "bicubic",
) -> ProcessedImage:
    """Turn an input's bytes into what a shard stores; raises :class:`Rejected`.

    ``keep_formats`` holds lower-case format names ("jpeg", "png", "webp") whose original bytes
    may be stored unchanged when no other change is due; ``resample`` is "bicubic" or "bilinear".
    """
    if not data:
        raise Rejected(Reason.EMPTY, "zero bytes")
    image = _open(data)  # parses the header only
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(Reason.TOO_MANY_PIXELS, f"{width}x{height} is over max_pixels={max_pixels}")
    orientation = _orientation(image)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    target = target_size(width, height, max_size)
    # Phone cameras write MPO: a JPEG followed by more pictures, which readers decode as that JPEG.
    fmt = "JPEG" if image.format == "MPO" else image.format
    keep = (
        target is None
        and orientation == 1
        and fmt.lower() in keep_formats
        and fmt in EXTENSIONS
        and _is_plain_rgb(image, data)
    )

    if fmt == "JPEG":
        _check_jpeg_complete(data)
    if fmt == "JPEG" and image.mode in ("RGB", "L", "CMYK") and not _draft_helps(image, target):
        pixels = _decode_jpeg_fast(data)
    else:
        pixels = _decode_pil(image, orientation, target)
    if keep:
        return ProcessedImage(data, EXTENSIONS[fmt], width, height, kept_original=True)
    if target is not None and (pixels.shape[2], pixels.shape[1]) != target:
        # Antialiased like PIL's resize; uint8 in and out (rounded and clamped). (3, H, W)
        pixels = TF.resize(pixels, [target[1], target[0]], interpolation=_FILTERS[resample], antialias=True)
    # No .contiguous(): the resize returns channels-last memory, which is the (H, W, C) layout the
    # encoder wants; making it (C, H, W)-contiguous first would cost a copy each way.
    with _quiet_torchvision_io():
        encoded = encode_jpeg(pixels, quality=quality)
    return ProcessedImage(encoded.numpy().tobytes(), "jpg", width, height, kept_original=False)


@contextlib.contextmanager
def _quiet_torchvision_io() -> Iterator[None]:
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every call.
    # They remain the fastest libjpeg-turbo path we have; moving to TorchCodec waits until they go.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        yield


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We apply our own max_pixels limit right after; PIL's own warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise Rejected(Reason.TOO_MANY_PIXELS, str(error)) from None
    except UnidentifiedImageError:
        if data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise Rejected(Reason.UNDECODABLE, "image header is damaged") from None
        raise Rejected(Reason.NOT_AN_IMAGE, f"no known image format (starts with {data[:8]!r})") from None
    except Exception as error:  # PIL plugins raise assorted errors on malformed headers
        raise Rejected(Reason.UNDECODABLE, f"header: {type(error).__name__}: {error}") from None


def _orientation(image: Image.Image) -> int:
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block is no reason to lose the image: treat it as upright
        return 1
    return value if 1 <= value <= 8 else 1


def _is_plain_rgb(image: Image.Image, data: bytes) -> bool:
    """8-bit RGB without transparency: what every reader decodes to the same pixels."""
    if image.mode != "RGB" or "transparency" in image.info:
        return False
    if image.format == "PNG":
        # PIL reports 16-bit RGB PNGs as "RGB"; IHDR byte 24 is the bit depth, 25 the colour type.
        return data[24] == 8 and data[25] == 2
    return True


def _check_jpeg_complete(data: bytes) -> None:
    # In entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an EOI marker
    # (FF D9) after the last start-of-scan (FF DA) means the file was not cut short.
    last_scan = data.rfind(b"\xff\xda")
    if last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan:
        raise Rejected(Reason.TRUNCATED, f"JPEG has no end-of-image marker after its last scan ({len(data)} bytes)")


def _draft_helps(image: Image.Image, target: tuple[int, int] | None) -> bool:
    # DCT scaling decodes at 1/2, 1/4 or 1/8 of the size, never below the target: it only saves
    # work when the target is at most half the source. Otherwise the full libjpeg-turbo decode wins.
    return target is not None and min(image.size) >= 2 * min(target)


def _decode_jpeg_fast(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8, upright."""
    try:
        with _quiet_torchvision_io():
            return decode_jpeg(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
    except RuntimeError as error:
        message = str(error)
        reason = Reason.TRUNCATED if "truncated" in message or "incomplete" in message else Reason.UNDECODABLE
        raise Rejected(reason, f"libjpeg: {message.splitlines()[-1]}") from None


def _decode_pil(image: Image.Image, orientation: int, target: tuple[int, int] | None) -> torch.Tensor:
    """(3, H, W) uint8, upright, RGB."""
    if target is not None and image.format in ("JPEG", "MPO") and _draft_helps(image, target):
        stored = (target[1], target[0]) if orientation in _TRANSPOSING_ORIENTATIONS else target
        image.draft("RGB" if image.mode == "RGB" else None, stored)
    try:
        image.load()
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        message = str(error)
        truncated = isinstance(error, EOFError) or "truncated" in message or "end of file" in message.lower()
        raise Rejected(
            Reason.TRUNCATED if truncated else Reason.UNDECODABLE, f"{type(error).__name__}: {message}"
        ) from None
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    rgb = np.asarray(_to_rgb(image))  # (H, W, 3)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, 16-bit, CMYK, palette and alpha images to 8-bit RGB; transparency over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert() clips 16-bit values at 255; scale the full range down instead.
        values = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8))  # 2-D uint8: mode "L"
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
