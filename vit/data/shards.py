"""Reading shards: one tar's samples grouped by key, and a sample decoded into an image and its label.

Security: only image and ``.cls`` members are read from a tar; anything else (``.pyd``, ``.pth``,
``.pickle``, even ``.json``) is skipped unread, so nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator
from typing import NamedTuple

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vit.data.index import open_binary

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
LABEL_EXTENSION = "cls"


class RawSample(NamedTuple):
    key: str
    shard: str
    members: dict[str, bytes]  # extension -> bytes; only image and .cls members are ever read


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    directory, base = posixpath.split(name)
    dot = base.find(".")
    if dot <= 0:
        return None
    return posixpath.join(directory, base[:dot]), base[dot + 1 :].lower()


def iter_shard(url: str, skip: int = 0) -> Iterator[RawSample]:
    """The samples of one tar, grouped by key, after skipping ``skip`` of them unread.

    Only members whose extension is an image or ``cls`` are read; the rest are skipped unread.
    """
    with open_binary(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        key, members, index = None, {}, -1
        for member in tar:
            if not member.isfile():
                continue
            parsed = _split_name(member.name)
            if parsed is None:
                continue
            member_key, ext = parsed
            if member_key != key:
                if key is not None and index >= skip:
                    yield RawSample(key, url, members)
                key, members, index = member_key, {}, index + 1
            if index >= skip and (ext in IMAGE_EXTENSIONS or ext == LABEL_EXTENSION):
                members[ext] = tar.extractfile(member).read()
        if key is not None and index >= skip:
            yield RawSample(key, url, members)


def decode_sample(sample: RawSample, num_classes: int) -> tuple[torch.Tensor, int]:
    """(3, H, W) uint8 RGB image and its label; ``ValueError`` when the sample is unusable."""
    images = [ext for ext in sample.members if ext in IMAGE_EXTENSIONS]
    if len(images) != 1:
        raise ValueError(f"expected one image member, found {images or 'none'}")
    if LABEL_EXTENSION not in sample.members:
        raise ValueError("no .cls member")
    try:
        label = int(sample.members[LABEL_EXTENSION].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f".cls is not an ASCII integer: {sample.members[LABEL_EXTENSION][:20]!r}") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes})")
    return decode_image(sample.members[images[0]], what=f".{images[0]}"), label


def decode_image(data: bytes, what: str = "image") -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, WebP, ... whatever PIL reads) -> (3, H, W) uint8 RGB, upright (EXIF
    orientation applied, as ``pipeline`` stores images); ``ValueError`` naming ``what`` and the decoder's
    reason when they are not an image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} is not encoded image bytes but {type(data).__name__}")
    # PIL rather than torchvision.io (deprecated in 0.29); PIL also refuses decompression bombs.
    try:
        with Image.open(io.BytesIO(data)) as opened:
            # upright, as the pipeline stores images (a camera's EXIF orientation applied; shards have none)
            ImageOps.exif_transpose(opened, in_place=True)
            image = opened.convert("RGB")
    except UnidentifiedImageError:  # its message would only repeat the BytesIO's repr
        raise ValueError(f"undecodable {what} (no image format PIL reads; starts with {bytes(data[:8])!r})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"undecodable {what} ({type(error).__name__}: {error})") from None
    from torchvision.transforms.v2.functional import (
        pil_to_tensor,  # torchvision: loaded where images are
    )

    return pil_to_tensor(image)
