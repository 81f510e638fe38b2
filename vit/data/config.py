"""``DataConfig``: how a split becomes batches (batch size, workers, crops, augmentation, limits), checked
once when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """How a split becomes batches. ``batch_size`` is per rank (per loader)."""

    batch_size: int = 128
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples held per worker; 0 or 1: shard-order only
    seed: int = 0
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (Inception-style)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment: bool = False
    randaugment_num_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0  # probability an image gets a random rectangle of noise (DeiT: 0.25)
    mixup_alpha: float = 0.0  # > 0 enables MixUp (soft targets)
    cutmix_alpha: float = 0.0  # > 0 enables CutMix; with both, one is picked per batch
    mix_prob: float = 1.0  # probability a batch is mixed at all (with MixUp or CutMix on)
    mix_switch_prob: float = 0.5  # with both on: probability a mixed batch gets CutMix rather than MixUp
    mix_off_epoch: int = 0  # > 0: no MixUp / CutMix from this epoch (0-based) on, as DeiT's last epochs; 0: never off
    # training: each image read this many times an epoch, augmented independently each time, the copies on
    # different ranks (vit.data.plan); the epoch keeps its length, so it holds 1/k as many distinct images.
    # DeiT: 3. 1: off
    repeated_augmentation: int = 1
    crop_pct: float = 0.875  # eval: resize the shorter side to image_size / crop_pct, then center-crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    drop_last: bool = False  # training: floor instead of ceil batches per epoch (no padding samples)
    max_bad_samples: int = 100  # corrupt samples tolerated per loader (all epochs, all workers)
    max_bad_shards: int = 2  # unreadable shards tolerated per loader
    pin_memory: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        for name in ("batch_size", "image_size", "repeated_augmentation"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_workers", "shuffle_buffer", "seed", "max_bad_samples", "max_bad_shards",
                     "randaugment_num_ops", "randaugment_magnitude", "mix_off_epoch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        low, high = self.crop_scale
        if len(self.crop_scale) != 2 or not 0 < low <= high <= 1:
            problems.append(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio}")
        for name in ("hflip", "random_erasing", "mix_prob", "mix_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.randaugment_magnitude <= 30:
            problems.append(f"randaugment_magnitude must be in [0, 30], got {self.randaugment_magnitude}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.crop_pct <= 1:
            problems.append(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append(f"mean and std must be 3 values each, std > 0; got {self.mean}, {self.std}")
        if problems:
            raise ValueError("invalid DataConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown DataConfig keys: {', '.join(unknown)}")
        return cls(**data)
