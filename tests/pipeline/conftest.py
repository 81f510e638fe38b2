"""Corpora for the pipeline tests: small real subsets of ../shared/datasets, and generated bad files.

The subsets are copies of a few real files (never the whole corpus), so each sharding run takes a
second or two in-process.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import DATASETS
from tests.raydir import short_ray_tmpdir

FLOWERS = DATASETS / "flowers17"
CIFAR = DATASETS / "cifar10"
FLOWER_CLASSES = ("00_daffodil", "05_iris", "16_pansy")


@pytest.fixture(scope="session")
def flowers_subset(tmp_path_factory) -> Path:
    """Flowers-17 layout (train/ and test/ split folders) with 3 classes: 8 train and 3 test images each."""
    root = tmp_path_factory.mktemp("flowers") / "flowers17"
    for split, count in (("train", 8), ("test", 3)):
        for name in FLOWER_CLASSES:
            (root / split / name).mkdir(parents=True)
            for file in sorted((FLOWERS / split / name).iterdir())[:count]:
                shutil.copyfile(file, root / split / name / file.name)
    return root


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory) -> Path:
    """CIFAR-10 Parquet files (Hugging Face layout, schema metadata kept): 240 train rows, 80 test rows."""
    root = tmp_path_factory.mktemp("cifar") / "cifar10"
    root.mkdir()
    for split, rows in (("train", 240), ("test", 80)):
        name = f"{split}-00000-of-00001.parquet"
        table = pq.read_table(CIFAR / name).slice(0, rows)  # slicing keeps the 'huggingface' metadata
        pq.write_table(table, root / name, row_group_size=64)  # several row groups: reads pick groups
    return root


def jpeg_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **save)
    return buffer.getvalue()


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def left_red_right_blue(width: int = 60, height: int = 40) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def rotated_jpeg() -> bytes:
    """60x40 stored pixels, red left half, with EXIF orientation 6: shown rotated 90 degrees clockwise."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(left_red_right_blue(), exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    """16-bit grayscale at 40000/65535: a converter that clips at 255 would make it white."""
    return png_bytes(Image.fromarray(np.full((32, 48), 40000, np.uint16)))


def palette_png_with_transparency() -> bytes:
    """Palette image: left half index 0 (transparent), right half index 1 (opaque green)."""
    image = Image.new("P", (40, 20), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (20, 0, 40, 20))
    return png_bytes(image, transparency=0)


@dataclass(frozen=True)
class BadCorpus:
    root: Path
    expected_sharded: frozenset[str]  # source identities that must end up in shards
    expected_quarantine: dict[str, str]  # source identity -> reason
    max_pixels: int


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory) -> BadCorpus:
    """An image folder mixing real photos with every kind of awkward or broken file the issue lists."""
    root = tmp_path_factory.mktemp("bad") / "corpus"
    good, other = root / "flowers", root / "shapes"
    good.mkdir(parents=True)
    other.mkdir()
    photos = sorted((FLOWERS / "train" / "00_daffodil").iterdir())[:3]
    for photo in photos:
        shutil.copyfile(photo, good / photo.name)
    photo_bytes = photos[0].read_bytes()
    files = {
        "flowers/truncated.jpg": photo_bytes[: len(photo_bytes) // 2],
        "flowers/zero.jpg": b"",
        "flowers/notes.jpg": b"this is a text file, not a picture\n",
        "flowers/readme.txt": b"a file with a non-image extension\n",
        "flowers/cmyk.jpg": jpeg_bytes(Image.open(photos[1]).convert("CMYK")),
        "shapes/sixteen.png": sixteen_bit_png(),
        "shapes/palette.png": palette_png_with_transparency(),
        "shapes/rotated.jpg": rotated_jpeg(),
        "shapes/plain.png": png_bytes(left_red_right_blue()),  # kept as PNG, extension and all
        "shapes/huge.png": png_bytes(Image.new("RGB", (2000, 2000), (9, 9, 9))),  # small file, 4 M pixels
        "loose.jpg": photo_bytes,  # no class folder
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / ".DS_Store").write_bytes(b"hidden files are not inputs")
    return BadCorpus(
        root=root,
        expected_sharded=frozenset(
            [f"flowers/{p.name}" for p in photos]
            + ["flowers/cmyk.jpg", "shapes/sixteen.png", "shapes/palette.png", "shapes/rotated.jpg", "shapes/plain.png"]
        ),
        expected_quarantine={
            "flowers/truncated.jpg": "truncated",
            "flowers/zero.jpg": "empty",
            "flowers/notes.jpg": "not_an_image",
            "flowers/readme.txt": "not_an_image",
            "shapes/huge.png": "too_many_pixels",
            "loose.jpg": "unknown_label",
        },
        max_pixels=1_000_000,  # the photos have ~350 k pixels
    )


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (2 CPUs) per test module, its state in a short temp dir (socket paths are length-limited)."""
    import ray

    with short_ray_tmpdir() as temp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
        try:
            yield
        finally:
            ray.shutdown()
