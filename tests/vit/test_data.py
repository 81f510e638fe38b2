"""The shard loader: equal batch counts per rank, coverage, per-epoch shard order, no unpickling,
corrupt samples counted, exact resume. Shards are written here from real CIFAR-10 JPEGs."""

from __future__ import annotations

import functools
import io
import json
import logging
import pickle
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from tests.conftest import DATASETS
from vit.data import (
    DataConfig,
    DataError,
    eval_loader,
    read_dataset_index,
    train_loader,
)
from vit.data.plan import plan_epoch, shard_order

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@functools.lru_cache(maxsize=1)
def cifar_rows(count: int = 512) -> list[tuple[bytes, int]]:
    """(JPEG bytes, label) of the first CIFAR-10 test rows."""
    table = pq.read_table(DATASETS / "cifar10" / "test-00000-of-00001.parquet").slice(0, count).to_pylist()
    return [(row["image"]["bytes"], int(row["label"])) for row in table]


def write_dataset(root: Path, splits: dict[str, list[int]], *, extra_members: dict | None = None,
                  corrupt: set[str] = frozenset()) -> Path:
    """Write ``root/<split>/<split>-NNNNNN.tar`` with the given shard sizes and ``root/dataset.json``.

    ``extra_members``: {key: {ext: bytes}} added to those samples; ``corrupt``: keys whose JPEG is garbage.
    """
    rows = cifar_rows()
    doc = {"format": "vitflow-shards", "version": 1, "class_names": CLASS_NAMES, "num_classes": 10,
           "splits": {}, "fingerprint": "test"}
    cursor = 0
    for split, sizes in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for index, size in enumerate(sizes):
            rel = f"{split}/{split}-{index:06d}.tar"
            with wds.TarWriter(str(root / rel)) as sink:
                for _ in range(size):
                    image, label = rows[cursor % len(rows)]
                    key = f"{split}{cursor:05d}"
                    cursor += 1
                    sample = {"__key__": key, "jpg": b"\xff\xd8 not a jpeg" if key in corrupt else image,
                              "cls": str(label).encode(),
                              "json": json.dumps({"source": key, "label": label}).encode()}
                    sample.update((extra_members or {}).get(key, {}))
                    sink.write(sample)
            shards.append({"path": rel, "num_samples": size, "bytes": (root / rel).stat().st_size, "sha256": "-"})
        doc["splits"][split] = {"num_samples": sum(sizes), "counts": {}, "shards": shards}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def tiny_config(**overrides) -> DataConfig:
    fields = dict(batch_size=4, num_workers=0, shuffle_buffer=8, image_size=32, crop_scale=(0.5, 1.0), crop_pct=1.0)
    fields.update(overrides)
    return DataConfig(**fields)


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch.keys]


UNEVEN = [7, 3, 12, 1, 9]  # 32 samples in 5 shards


@pytest.fixture
def uneven(tmp_path) -> Path:
    return write_dataset(tmp_path, {"train": UNEVEN, "val": [5, 6]})


def test_plan_gives_every_rank_the_same_batches_and_covers_the_epoch():
    for total in (1, 7, 32, 33, 100):
        for world, batch, roles in ((1, 4, 1), (2, 4, 2), (3, 5, 2), (4, 3, 3)):
            plans = [plan_epoch(total, batch, r, world, roles, train=True) for r in range(world)]
            assert len({b for b, _ in plans}) == 1
            spans = sorted((s.start, s.num_samples) for _, ranges in plans for s in ranges)
            assert spans[0][0] == 0 and sum(n for _, n in spans) >= total
            assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))  # contiguous, no overlap
            evals = [plan_epoch(total, batch, r, world, roles, train=False) for r in range(world)]
            assert sum(s.num_samples for _, ranges in evals for s in ranges) == total


def test_repeated_augmentation_plan_reads_each_sample_k_times_on_k_ranks():
    for total in (7, 32, 33, 100):
        for world, batch, roles in ((1, 4, 1), (2, 4, 2), (3, 5, 2), (4, 3, 3)):
            for repeats in (2, 3):
                plain = [plan_epoch(total, batch, r, world, roles, train=True) for r in range(world)]
                plans = [plan_epoch(total, batch, r, world, roles, train=True, repeats=repeats, epoch=1)
                         for r in range(world)]
                # the epoch keeps its length: the same batches on every rank as without repeats
                assert {b for b, _ in plans} == {plain[0][0]}
                per_rank = plain[0][0] * batch
                unique = -(-per_rank // repeats)
                copies: dict[int, list[int]] = {}
                for rank, (_, ranges) in enumerate(plans):
                    assert sum(s.num_samples for s in ranges) == per_rank
                    for span in ranges:
                        for start, count in span.segments:
                            for position in range(start, start + count):
                                copies.setdefault(position % total, []).append(rank)
                if world * unique <= total:  # distinct positions: no wrap-around onto themselves
                    assert len(copies) == world * unique
                    assert sum(len(ranks) == repeats for ranks in copies.values()) >= len(copies) - world * (repeats - 1)
                    assert all(len(ranks) <= repeats for ranks in copies.values())
                    if repeats <= world:  # the copies of a sample go to different ranks
                        assert all(len(set(ranks)) == len(ranks) for ranks in copies.values())
                # epoch 1 starts where epoch 0's distinct samples ended
                first = plan_epoch(total, batch, 0, world, roles, train=True, repeats=repeats, epoch=0)[1][0]
                assert plans[0][1][0].start == (first.start + world * unique) % total
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        plan_epoch(10, 2, 0, 1, 1, train=True, repeats=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_repeated_augmentation_on_real_shards(uneven, workers):
    """Two ranks, k = 2: equal batches as without repeats, 16 distinct images each seen twice, once per
    rank, augmented differently; a resumed epoch gives the same batches."""
    config = tiny_config(num_workers=workers, repeated_augmentation=2, shuffle_buffer=4)
    loaders = [train_loader(uneven, config, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(loader.epoch(0)) for loader in loaders]
    assert [len(b) for b in per_rank] == [4, 4] == [loader.batches_per_epoch for loader in loaders]
    keys = [keys_of(batches) for batches in per_rank]
    seen = Counter(keys[0] + keys[1])
    assert len(seen) == 16 and set(seen.values()) == {2}
    assert set(keys[0]) == set(keys[1])  # each image's two copies: one on each rank
    images = {}
    for batches in per_rank:
        for batch in batches:
            for key, image in zip(batch.keys, batch.images):
                images.setdefault(key, []).append(image)
    assert all(not torch.equal(a, b) for a, b in images.values())  # augmented independently
    # the next epoch reads the next 16 distinct images: the two epochs cover all 32
    next_keys = set(keys_of(loaders[0].epoch(1))) | set(keys_of(loaders[1].epoch(1)))
    assert len(next_keys) == 16 and next_keys | set(seen) == {f"train{i:05d}" for i in range(32)}
    full, resumed = list(loaders[1].epoch(3)), list(loaders[1].epoch(3, start_batch=2))
    for a, b in zip(full[2:], resumed, strict=True):
        assert a.keys == b.keys
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_one_rank_reads_each_image_k_times(uneven):
    config = tiny_config(repeated_augmentation=3, batch_size=8)
    loader = train_loader(uneven, config, rank=0, world_size=1)
    batches = list(loader.epoch(0))
    assert len(batches) == 4  # ceil(32 / 8): the epoch's length does not change
    seen = Counter(keys_of(batches))
    assert len(seen) == 11 and sorted(seen.values()) == [2] + [3] * 10  # ceil(32 / 3) = 11; the last cut short
    images = {}
    for batch in batches:
        for key, image in zip(batch.keys, batch.images):
            images.setdefault(key, []).append(image)
    for copies in images.values():  # augmented independently, wherever the shuffle buffer put them
        assert all(not torch.equal(a, b) for i, a in enumerate(copies) for b in copies[i + 1:])


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_get_equal_batches_and_cover_uneven_shards(uneven, workers):
    config = tiny_config(num_workers=workers)
    loaders = [train_loader(uneven, config, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(loader.epoch(0)) for loader in loaders]
    assert [len(b) for b in per_rank] == [4, 4] == [loader.batches_per_epoch for loader in loaders]  # ceil(32/8)
    assert all(batch.images.shape == (4, 3, 32, 32) and batch.targets.dtype == torch.int64
               for batches in per_rank for batch in batches)
    seen = Counter(keys_of(per_rank[0]) + keys_of(per_rank[1]))
    assert set(seen) == {f"train{i:05d}" for i in range(32)}
    assert max(seen.values()) == 1  # 32 samples = 2 ranks x 4 batches x 4: no padding needed


def test_fewer_shards_than_ranks_times_workers(tmp_path):
    root = write_dataset(tmp_path, {"train": [10, 3]})
    loaders = [train_loader(root, tiny_config(num_workers=2, batch_size=2), rank=r, world_size=3) for r in range(3)]
    per_rank = [list(loader.epoch(1)) for loader in loaders]
    assert [len(b) for b in per_rank] == [3, 3, 3]  # ceil(13 / 6)
    seen = Counter(key for batches in per_rank for key in keys_of(batches))
    assert set(seen) == {f"train{i:05d}" for i in range(13)} and sum(seen.values()) == 18  # 5 padding repeats


def test_shard_order_changes_per_epoch_and_agrees_across_ranks(uneven):
    orders = [shard_order(len(UNEVEN), seed=0, epoch=epoch) for epoch in range(6)]
    assert len({tuple(o) for o in orders}) > 1
    assert shard_order(len(UNEVEN), seed=0, epoch=3) == orders[3]
    config = tiny_config()
    epoch_keys = []
    for epoch in (0, 1):
        keys = [keys_of(train_loader(uneven, config, rank=r, world_size=2).epoch(epoch)) for r in range(2)]
        assert set(keys[0]).isdisjoint(keys[1])  # both ranks used the same order to divide the epoch
        epoch_keys.append(keys)
    assert epoch_keys[0] != epoch_keys[1]


def test_resume_mid_epoch_yields_the_same_batches(uneven):
    config = tiny_config(num_workers=2, mixup_alpha=0.8, cutmix_alpha=1.0, randaugment=True)
    loader = train_loader(uneven, config, rank=1, world_size=2)
    full = list(loader.epoch(2))
    resumed = list(loader.epoch(2, start_batch=1))
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        assert a.keys == b.keys
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.targets, b.targets, rtol=0, atol=0)
    assert full[0].targets.shape == (4, 10)  # MixUp / CutMix give soft targets


def test_eval_loader_sees_every_sample_once(uneven):
    config = tiny_config(num_workers=2, batch_size=2)
    loaders = [eval_loader(uneven, config, rank=r, world_size=2) for r in range(2)]
    keys = [key for loader in loaders for key in keys_of(loader)]
    assert sorted(keys) == [f"val{i:05d}" for i in range(32, 43)]
    batch = next(iter(loaders[0]))
    assert batch.images.shape == (2, 3, 32, 32)


def test_eval_transform_at_native_size_is_identity_up_to_normalisation(uneven):
    config = tiny_config(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    batch = next(iter(eval_loader(uneven, config, rank=0, world_size=1)))
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    first = pil_to_tensor(Image.open(io.BytesIO(cifar_rows()[32][0])).convert("RGB")).float() / 255
    torch.testing.assert_close(batch.images[0], first, atol=1e-6, rtol=0)


class _Exploit:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("workers", [0, 1])
def test_pickle_members_are_never_unpickled(tmp_path, workers):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    pickle.loads(payload).close()  # the payload works...
    assert marker.exists()
    marker.unlink()
    extra = {f"train{i:05d}": {"pyd": payload, "pickle": payload, "pth": payload} for i in range(5)}
    root = write_dataset(tmp_path / "data", {"train": [5, 3]}, extra_members=extra)
    batches = list(train_loader(root, tiny_config(num_workers=workers), rank=0, world_size=1).epoch(0))
    assert len(batches) == 2
    assert not marker.exists()  # ...but the loader never unpickled it


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_counted_and_skipped(tmp_path, caplog, workers):
    root = write_dataset(tmp_path, {"train": [6, 6]}, corrupt={"train00001", "train00007"})
    loader = train_loader(root, tiny_config(num_workers=workers, batch_size=3), rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="vit.data"):
        batches = list(loader.epoch(0))
    assert [b.images.shape[0] for b in batches] == [3] * 4  # full batches: the next samples stand in
    assert not {"train00001", "train00007"} & set(keys_of(batches))
    # Summed over workers; >= 2 because stand-ins come from past the range, where the cycle can meet them again.
    assert loader.stats.bad_samples >= 2
    if workers == 0:  # worker processes log through their own copies of the handlers
        assert "train00001" in caplog.text and "train00007" in caplog.text


def test_too_many_corrupt_samples_fail_naming_the_shard(tmp_path):
    root = write_dataset(tmp_path, {"train": [4, 6]}, corrupt={f"train{i:05d}" for i in range(4, 8)})
    loader = train_loader(root, tiny_config(max_bad_samples=2), rank=0, world_size=1)
    with pytest.raises(DataError, match=r"train-000001\.tar.*max_bad_samples=2"):
        list(loader.epoch(0))


def test_unreadable_shard_is_skipped_then_fatal_past_the_limit(tmp_path):
    root = write_dataset(tmp_path, {"train": [4, 4, 4]})
    (root / "train" / "train-000001.tar").write_bytes(b"this is not a tar archive" * 40)
    loader = train_loader(root, tiny_config(max_bad_shards=5), rank=0, world_size=1)
    batches = list(loader.epoch(0))
    assert len(batches) == 3 and loader.stats.bad_shards >= 1
    strict = train_loader(root, tiny_config(max_bad_shards=0), rank=0, world_size=1)
    with pytest.raises(DataError, match=r"train-000001\.tar"):
        list(strict.epoch(0))


def test_bad_manifest_and_config_fail_early(tmp_path):
    with pytest.raises(DataError, match="dataset.json"):
        read_dataset_index(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(DataError, match="vitflow-shards"):
        read_dataset_index(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="repeated_augmentation must be a positive integer, got 0"):
        DataConfig(repeated_augmentation=0)
    with pytest.raises(ValueError, match="unknown DataConfig keys: batchsize"):
        DataConfig.from_dict({"batchsize": 3})
    assert DataConfig.from_dict(tiny_config().to_dict()) == tiny_config()
