"""The sharder's configuration: everything that decides the bytes of the shards, checked once, early.

How a run is executed (worker count, cluster address, progress bar) is not configuration: it never
changes the output, so it is not here and not in the dataset fingerprint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

# Encodings a shard may store as-is: those every reader of the format decodes (docs/FORMAT.md).
# GIF, BMP and TIFF inputs are always re-encoded as JPEG.
KeptFormat = Literal["jpeg", "png", "webp"]


class ShardConfig(BaseModel):
    """Frozen; unknown keys are errors (``extra="forbid"``), so a misspelt option fails at load time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_size: PositiveInt | None = Field(
        None, description="Resize so the shorter side is at most this many pixels (aspect kept, never upscaled)."
    )
    resample: Literal["bicubic", "bilinear"] = Field(
        "bicubic", description="Antialiased resize filter; bilinear is ~25% faster, bicubic keeps more detail."
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality for re-encoded images.")
    keep_formats: tuple[KeptFormat, ...] = Field(
        ("jpeg", "png", "webp"),
        description="Encodings whose original bytes are kept when no resize, rotation or conversion is due; "
        "others are re-encoded as JPEG.",
    )
    max_pixels: PositiveInt = Field(
        89_478_485, description="Quarantine images with more pixels (decompression-bomb guard; PIL's default)."
    )
    target_shard_bytes: PositiveInt = Field(
        256 * 2**20, description="Aim for shards of about this size (planned from input sizes)."
    )
    max_shard_samples: PositiveInt | None = Field(None, description="At most this many samples per shard.")
    shard_multiple: PositiveInt = Field(
        8, description="Shard counts are rounded up to a multiple of this (ranks x loader workers, see FORMAT.md)."
    )
    val_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Carve this fraction of train (per class, seeded) into a 'val' split."
    )
    seed: int = Field(0, description="Seeds the sample order and the validation carve-out.")
    limit: PositiveInt | None = Field(
        None, description="Keep at most this many inputs per source split (a seeded sample): the tiny mode."
    )
