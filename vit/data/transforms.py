"""Per-image preprocessing (training crops, flips, RandAugment and random erasing; evaluation resize and
center crop) and the per-batch MixUp / CutMix, all built from a ``DataConfig`` with torchvision's ``v2``
transforms."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vit.data.config import DataConfig

if TYPE_CHECKING:  # torchvision is imported where a transform is built: `vitflow validate` and friends need none
    from torchvision.transforms import v2


def train_transform(config: DataConfig) -> v2.Transform:
    """Per image, on (3, H, W) uint8: crop, flip, optional RandAugment, then float + normalise, then optional
    random erasing (Zhong et al. 2017) with per-pixel normal noise, as DeiT and timm erase."""
    from torchvision.transforms import v2

    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(config.image_size, scale=config.crop_scale, ratio=config.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(config.hflip),
    ]
    if config.randaugment:
        steps.append(v2.RandAugment(num_ops=config.randaugment_num_ops, magnitude=config.randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.mean, config.std)]
    if config.random_erasing > 0:
        steps.append(v2.RandomErasing(p=config.random_erasing, value="random"))
    return v2.Compose(steps)


def eval_transform(config: DataConfig) -> v2.Transform:
    """Resize the shorter side to ``image_size / crop_pct``, center-crop ``image_size``, normalise."""
    from torchvision.transforms import v2

    resize = int(round(config.image_size / config.crop_pct))
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(config.image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(config.mean, config.std),
    ])


def batch_transform(config: DataConfig, num_classes: int, epoch: int = 0) -> v2.Transform | None:
    """MixUp / CutMix on a whole batch of epoch ``epoch``: int labels (B,) -> soft targets (B, K). With both
    on, a mixed batch gets CutMix with probability ``mix_switch_prob``; a batch is mixed at all with
    probability ``mix_prob`` (an unmixed one keeps its int labels). ``None`` when both are off, or from
    ``mix_off_epoch`` on."""
    from torchvision.transforms import v2

    if config.mix_off_epoch and epoch >= config.mix_off_epoch:
        return None
    choices = []
    if config.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices, p=[1 - config.mix_switch_prob, config.mix_switch_prob])
    return mix if config.mix_prob >= 1 else v2.RandomApply([mix], p=config.mix_prob)
