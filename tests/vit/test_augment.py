"""The training pack's augmentations (vit.data.transforms): random erasing, the MixUp / CutMix switch and
probability and their switch-off epoch, checked by what they do to real CIFAR-10 images; and a run with
all of them on, trained with soft targets and evaluated against hard labels."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from tests.vit.test_data import cifar_rows, tiny_config, write_dataset
from tests.vit.test_loop import Recorder, tiny_model
from vit.data import DataConfig, eval_loader, train_loader
from vit.data.transforms import batch_transform, train_transform
from vit.loop import TrainConfig, fit


def real_batch(count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` CIFAR-10 test images as normalised floats (B, 3, 32, 32), and their labels."""
    images, labels = [], []
    for data, label in cifar_rows()[:count]:
        array = torch.frombuffer(bytearray(Image.open(io.BytesIO(data)).convert("RGB").tobytes()), dtype=torch.uint8)
        images.append(array.reshape(32, 32, 3).permute(2, 0, 1).float() / 255)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def image_uint8() -> torch.Tensor:
    data, _ = cifar_rows()[0]
    array = torch.frombuffer(bytearray(Image.open(io.BytesIO(data)).convert("RGB").tobytes()), dtype=torch.uint8)
    return array.reshape(32, 32, 3).permute(2, 0, 1).clone()


def test_random_erasing_replaces_a_rectangle_with_noise():
    plain, erased = (train_transform(tiny_config(crop_scale=(1.0, 1.0), hflip=0.0, random_erasing=p)) for p in (0.0, 1.0))
    image = image_uint8()
    torch.manual_seed(0)
    before = plain(image)
    torch.manual_seed(0)
    after = erased(image)
    changed = (before != after).any(dim=0)  # (H, W)
    rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
    assert changed.sum() > 0
    # One axis-aligned box, every pixel of it replaced: the box is exactly the changed pixels.
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all() and changed.sum() == box.numel()
    noise = after[:, changed]
    assert abs(float(noise.mean())) < 0.5 and 0.5 < float(noise.std()) < 1.5  # standard normal values


def test_cutmix_when_the_switch_says_so_and_mixup_otherwise():
    images, labels = real_batch()
    rolled_images, rolled_labels = images.roll(1, 0), labels.roll(1, 0)  # torchvision mixes each with its neighbour
    differ = labels != rolled_labels
    for switch, kind in ((1.0, "cutmix"), (0.0, "mixup")):
        mix = batch_transform(tiny_config(mixup_alpha=0.8, cutmix_alpha=1.0, mix_switch_prob=switch), num_classes=10)
        for seed in range(5):
            torch.manual_seed(seed)
            mixed, targets = mix(images.clone(), labels.clone())
            assert targets.shape == (8, 10) and torch.allclose(targets.sum(1), torch.ones(8))
            lam = targets[differ, labels[differ]]  # the share of each image's own class
            if kind == "cutmix":  # every pixel is one image's or the other's; lambda is the area kept
                own = (mixed == images).all(dim=1)
                assert ((mixed == rolled_images).all(dim=1) | own).all()
                torch.testing.assert_close(own[differ].float().mean(dim=(1, 2)), lam, atol=1 / 1024, rtol=0)
            else:  # every pixel is the same blend
                expected = lam[:, None, None, None] * images[differ] + (1 - lam[:, None, None, None]) * rolled_images[differ]
                torch.testing.assert_close(mixed[differ], expected, atol=1e-5, rtol=0)


def test_mix_prob_leaves_some_batches_unmixed():
    images, labels = real_batch()
    never = batch_transform(tiny_config(mixup_alpha=0.8, mix_prob=0.0), num_classes=10)
    same_images, same_labels = never(images.clone(), labels.clone())
    assert torch.equal(same_images, images) and torch.equal(same_labels, labels)  # int labels kept
    half = batch_transform(tiny_config(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.5), num_classes=10)
    torch.manual_seed(0)
    kinds = [half(images.clone(), labels.clone())[1].ndim for _ in range(200)]
    assert 70 < kinds.count(2) < 130 and kinds.count(1) == 200 - kinds.count(2)


def test_mixing_is_off_from_mix_off_epoch_on(tmp_path):
    dataset = write_dataset(tmp_path, {"train": [8, 8], "val": [4]})
    loader = train_loader(dataset, tiny_config(mixup_alpha=0.8, cutmix_alpha=1.0, mix_off_epoch=2), rank=0, world_size=1)
    shapes = {epoch: {batch.targets.shape for batch in loader.epoch(epoch)} for epoch in range(4)}
    assert shapes == {0: {(4, 10)}, 1: {(4, 10)}, 2: {(4,)}, 3: {(4,)}}


def test_augmentation_options_are_checked():
    for name in ("random_erasing", "mix_prob", "mix_switch_prob"):
        with pytest.raises(ValueError, match=rf"{name} must be a probability in \[0, 1\], got 1.5"):
            DataConfig(**{name: 1.5})
    with pytest.raises(ValueError, match="mix_off_epoch must be an integer >= 0"):
        DataConfig(mix_off_epoch=-1)


def test_a_run_with_every_augmentation_trains_on_soft_targets_and_evaluates_on_hard_labels(tmp_path):
    dataset = write_dataset(tmp_path, {"train": [40, 24], "val": [20]})
    data = tiny_config(batch_size=8, randaugment=True, random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0,
                       mix_prob=0.9, mix_off_epoch=2, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    assert next(iter(train_loader(dataset, data, rank=0, world_size=1).epoch(0))).targets.shape == (8, 10)
    report = Recorder()
    final = fit(tiny_model(), train_loader(dataset, data, rank=0, world_size=1), eval_loader(dataset, data, rank=0, world_size=1),
                TrainConfig(total_steps=24, log_every=8, eval_every=24, label_smoothing=0.1), report=report)
    losses = [metrics["train/loss"] for _, metrics, _ in report.calls if "train/loss" in metrics]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))  # 3 epochs: 2 mixed, 1 not
    assert final["val/num_samples"] == 20 and 0 <= final["val/top1"] <= final["val/top5"] <= 1
