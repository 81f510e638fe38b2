"""The loader: one split of a shard dataset as batches for one rank (``ShardLoader``, ``train_loader``,
``eval_loader``), each worker reading its share of the epoch plan (``vit.data.plan``) through a shuffle
buffer, decoding (``vit.data.shards``) and augmenting (``vit.data.transforms``).

A corrupt sample is skipped and replaced by the next one in the stream (counted and logged); an unreadable
shard is skipped the same way; each has a limit.

Determinism and resume: every random choice is a function of ``(seed, epoch, rank, role, batch)``.
The shuffle buffer has its own seeded generator, and each batch's augmentations run under
``torch.random.fork_rng`` seeded for that batch, so ``epoch(e, start_batch=s)`` yields exactly the
batches an uninterrupted epoch yields from batch s on: the skipped batches are read but not decoded.
(Exact as long as the skipped stretch held no corrupt samples: skipping counts raw samples.) The data
order depends on the world size, the batch size and ``num_workers``; keep them when resuming.
"""

from __future__ import annotations

import itertools
import logging
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vit.data.config import DataConfig
from vit.data.index import DataError, ShardEntry, read_dataset_index
from vit.data.plan import RoleRange, derive_seed, plan_epoch, shard_order
from vit.data.shards import RawSample, decode_sample, iter_shard
from vit.data.transforms import batch_transform, eval_transform, train_transform

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) float32, normalised
    targets: torch.Tensor  # (B,) int64 labels, or (B, K) float soft targets after MixUp / CutMix
    keys: list[str]


class _WorkerBatch(NamedTuple):
    batch: Batch
    role: int
    bad_samples: int  # cumulative for this role in this epoch
    bad_shards: int
    last_bad: str


class _EpochStream(IterableDataset):
    """One rank's epoch, split into worker roles. Batches are assembled inside the workers
    (the DataLoader runs with ``batch_size=None``) so each carries its worker's error counters."""

    def __init__(self, shards: Sequence[ShardEntry], order: list[int], ranges: list[RoleRange], *, config: DataConfig,
                 num_classes: int, train: bool, epoch: int, rank: int, start_batch: int):
        super().__init__()
        self.shards, self.order, self.ranges = shards, order, ranges
        self.config, self.num_classes, self.train = config, num_classes, train
        self.epoch, self.rank, self.start_batch = epoch, rank, start_batch
        self.total = sum(shards[i].num_samples for i in order)

    def __iter__(self) -> Iterator[_WorkerBatch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        roles = len(self.ranges)
        # Explicit worker splitting: the DataLoader hands out batches round-robin starting at worker 0, and
        # rank-batch i belongs to role i % k; rotating by start_batch makes worker 0 serve the next batch.
        if num_workers != roles:
            raise RuntimeError(f"planned {roles} worker roles but the DataLoader runs {num_workers} workers")
        yield from self._role((worker + self.start_batch) % roles)

    def _positions(self, start: int) -> Iterator[tuple[ShardEntry, int]]:
        """(shard, samples to skip in it) from ``start`` on, cycling through the ordered shards forever."""
        position = start % self.total
        while True:
            for index in self.order:
                shard = self.shards[index]
                if position < shard.num_samples:
                    yield shard, position
                    position = 0
                else:
                    position -= shard.num_samples

    def _raw(self, start: int, counters: dict) -> Iterator[RawSample]:
        empty_cycles, seen = 0, 0
        for shard, skip in self._positions(start):
            try:
                for sample in iter_shard(shard.url, skip):
                    seen += 1
                    yield sample
            except (OSError, tarfile.TarError, EOFError) as error:
                counters["bad_shards"] += 1
                counters["last_bad"] = shard.url
                log.warning("unreadable shard %s (%s: %s); skipping it", shard.url, type(error).__name__, error)
                if counters["bad_shards"] > self.config.max_bad_shards:
                    raise DataError(
                        f"unreadable shard {shard.url} ({type(error).__name__}: {error}); "
                        f"{counters['bad_shards']} unreadable shards exceed max_bad_shards={self.config.max_bad_shards}"
                    ) from error
            empty_cycles = empty_cycles + 1 if seen == 0 else 0
            if empty_cycles > len(self.order):
                raise DataError(f"no readable samples in any shard of this split (last: {shard.url})")

    def _runs(self, segments: Sequence[tuple[int, int]], counters: dict) -> Iterator[RawSample]:
        """The samples of each (start, count) run, one run after the other."""
        for start, count in segments:
            raw = self._raw(start, counters)
            try:
                yield from itertools.islice(raw, count)
            finally:
                raw.close()

    def _shuffled(self, samples: Iterator[RawSample], rng: random.Random) -> Iterator[RawSample]:
        size = self.config.shuffle_buffer if self.train else 0
        if size <= 1:
            yield from samples
            return
        buffer: list[RawSample] = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            index = rng.randrange(size)
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _role(self, role: int) -> Iterator[_WorkerBatch]:
        config, span = self.config, self.ranges[role]
        if span.num_batches == 0:
            return
        counters = {"bad_samples": 0, "bad_shards": 0, "last_bad": ""}
        seed = derive_seed(config.seed, self.epoch, self.rank, role)
        # The range's own samples go through the shuffle buffer, so it never reads ahead into another role's
        # range; samples past the range only stand in for corrupt ones.
        stream = self._runs(span.segments, counters)
        if self.train:
            stream = self._shuffled(stream, random.Random(seed))
        stream = itertools.chain(stream, self._raw(span.end, counters))
        transform = train_transform(config) if self.train else eval_transform(config)
        mix = batch_transform(config, self.num_classes, self.epoch) if self.train else None
        roles = len(self.ranges)
        # Batches of this role already consumed before start_batch: rank-batches i < start_batch, i % k == role.
        first = max(0, -(-(self.start_batch - role) // roles))
        for _ in range(first * config.batch_size):  # read, not decoded
            next(stream)
        remaining = span.num_samples - first * config.batch_size
        for local in range(first, span.num_batches):
            size = min(config.batch_size, remaining)
            remaining -= size
            images, labels, keys = [], [], []
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, local))
                while len(images) < size:
                    sample = next(stream)
                    try:
                        image, label = decode_sample(sample, self.num_classes)
                    except ValueError as error:
                        self._bad_sample(sample, error, counters)
                        continue
                    images.append(transform(image))
                    labels.append(label)
                    keys.append(sample.key)
                batch_images, targets = torch.stack(images), torch.tensor(labels, dtype=torch.int64)
                if mix is not None:
                    batch_images, targets = mix(batch_images, targets)
            yield _WorkerBatch(Batch(batch_images, targets, keys), role, counters["bad_samples"],
                               counters["bad_shards"], counters["last_bad"])

    def _bad_sample(self, sample: RawSample, error: Exception, counters: dict) -> None:
        counters["bad_samples"] += 1
        counters["last_bad"] = sample.shard
        log.warning("skipping corrupt sample %r in %s: %s", sample.key, sample.shard, error)
        if counters["bad_samples"] > self.config.max_bad_samples:
            raise DataError(
                f"corrupt sample {sample.key!r} in shard {sample.shard} ({error}); {counters['bad_samples']} "
                f"corrupt samples exceed max_bad_samples={self.config.max_bad_samples}"
            )


@dataclass
class LoaderStats:
    """Corrupt samples and unreadable shards met by this loader, summed over epochs and workers."""

    bad_samples: int = 0
    bad_shards: int = 0
    last_bad: str = ""


class ShardLoader:
    """One split of a shard dataset, as one rank sees it. ``epoch(e, start_batch)`` iterates one epoch;
    iterating the loader itself is epoch 0 (what evaluation wants)."""

    def __init__(self, dataset_dir: str | Path, split: str, config: DataConfig, *, rank: int = 0,
                 world_size: int = 1, train: bool = True):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        self.index = read_dataset_index(dataset_dir)
        self.split_index = self.index.split(split)
        if self.split_index.num_samples == 0:
            raise DataError(f"{self.index.root}: split {split!r} has no samples")
        self.split, self.config, self.train = split, config, train
        self.rank, self.world_size = rank, world_size
        self.num_roles = max(config.num_workers, 1)
        self.batches_per_epoch, self._ranges = self._plan(0)
        self.stats = LoaderStats()

    def _plan(self, epoch: int) -> tuple[int, list[RoleRange]]:
        return plan_epoch(self.split_index.num_samples, self.config.batch_size, self.rank, self.world_size,
                          self.num_roles, train=self.train, drop_last=self.config.drop_last,
                          repeats=self.config.repeated_augmentation if self.train else 1, epoch=epoch)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.index.class_names

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (padding and repeated copies included for training)."""
        return sum(r.num_samples for r in self._ranges)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The rank's batches of ``epoch`` from ``start_batch`` on (resume: the first ones are skipped)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is not in [0, {self.batches_per_epoch}]")
        shards = self.split_index.shards
        order = shard_order(len(shards), self.config.seed, epoch) if self.train else list(range(len(shards)))
        stream = _EpochStream(shards, order, self._plan(epoch)[1], config=self.config, num_classes=self.num_classes,
                              train=self.train, epoch=epoch, rank=self.rank, start_batch=start_batch)
        workers = self.config.num_workers
        # Its own generator: creating a DataLoader iterator otherwise draws from the global torch RNG, and a
        # resumed run creates one at a different moment than the uninterrupted run did.
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, epoch, self.rank, start_batch))
        loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.config.pin_memory,
                            persistent_workers=False, generator=generator)
        return self._counted(loader)

    def _counted(self, loader: DataLoader) -> Iterator[Batch]:
        base = LoaderStats(self.stats.bad_samples, self.stats.bad_shards, self.stats.last_bad)
        per_role: dict[int, tuple[int, int]] = {}
        for item in loader:
            per_role[item.role] = (item.bad_samples, item.bad_shards)
            self.stats.bad_samples = base.bad_samples + sum(s for s, _ in per_role.values())
            self.stats.bad_shards = base.bad_shards + sum(s for _, s in per_role.values())
            if item.last_bad:
                self.stats.last_bad = item.last_bad
            if self.stats.bad_samples > self.config.max_bad_samples:
                raise DataError(f"{self.stats.bad_samples} corrupt samples (last in {self.stats.last_bad}) exceed "
                                f"max_bad_samples={self.config.max_bad_samples}")
            if self.stats.bad_shards > self.config.max_bad_shards:
                raise DataError(f"{self.stats.bad_shards} unreadable shards (last: {self.stats.last_bad}) exceed "
                                f"max_bad_shards={self.config.max_bad_shards}")
            yield item.batch


def train_loader(dataset_dir: str | Path, config: DataConfig, *, rank: int, world_size: int,
                 split: str = "train") -> ShardLoader:
    """Shuffled, augmented, cyclic: the same number of full batches on every rank each epoch."""
    return ShardLoader(dataset_dir, split, config, rank=rank, world_size=world_size, train=True)


def eval_loader(dataset_dir: str | Path, config: DataConfig, *, rank: int, world_size: int,
                split: str = "val") -> ShardLoader:
    """In manifest order, resize + center crop: every sample exactly once across ranks."""
    return ShardLoader(dataset_dir, split, config, rank=rank, world_size=world_size, train=False)
