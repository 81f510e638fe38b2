"""WebDataset shards -> batches for one rank: shard splitting, shuffling, decoding and augmentation.

Reads the on-disk contract that ``pipeline`` writes (``docs/FORMAT.md``): ``OUT/dataset.json`` lists every
split's shards with their sample counts, and each shard holds ``<key>.<image ext>``, ``<key>.cls`` and
``<key>.json`` members. ``vit`` reads that file format itself; it never imports ``pipeline``.

How an epoch is divided (the rule DDP depends on)
-------------------------------------------------
The epoch's shards are put in an order (a permutation seeded by ``seed + epoch`` for training, the
manifest order for evaluation) and concatenated into one sequence of N sample positions, repeated
cyclically. With W ranks, batch size b and k loader workers per rank:

- training: every rank gets exactly ``B = ceil(N / (W * b))`` batches (``floor`` with ``drop_last``), all
  of b samples. Rank r reads positions ``[r * B * b, (r + 1) * B * b)``, so the epoch covers every sample
  at least once; the last ranks wrap around to the sequence's start for the ``W * B * b - N`` samples of
  padding (as ``DistributedSampler`` pads). Worker roles split a rank's batches ``B // k`` each, the first
  ``B % k`` roles one more, each role reading a contiguous range of positions through a shuffle buffer.
- evaluation: rank r reads positions ``[floor(r * N / W), floor((r + 1) * N / W))`` once, in batches of b
  (the last one short): every sample is seen exactly once across ranks, and ranks differ by at most one
  batch. ``vit.loop.evaluate`` only synchronises after its loop, so that cannot hang DDP.

Reading a range costs one pass over its shards plus skipping into the first one, so ranks and workers
may outnumber shards and shards may be uneven. A corrupt sample is skipped and replaced by the next one
in the stream (counted and logged); an unreadable shard is skipped the same way; each has a limit.

Determinism and resume: every random choice is a function of ``(seed, epoch, rank, role, batch)``.
The shuffle buffer has its own seeded generator, and each batch's augmentations run under
``torch.random.fork_rng`` seeded for that batch, so ``epoch(e, start_batch=s)`` yields exactly the
batches an uninterrupted epoch yields from batch s on: the skipped batches are read but not decoded.
(Exact as long as the skipped stretch held no corrupt samples: skipping counts raw samples.) The data
order depends on the world size, the batch size and ``num_workers``; keep them when resuming.

Security: only image and ``.cls`` members are read from a tar; anything else (``.pyd``, ``.pth``,
``.pickle``, even ``.json``) is skipped unread, so nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import posixpath
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from PIL import Image
from torchvision.transforms import v2

log = logging.getLogger(__name__)

FORMAT_NAME = "vitflow-shards"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
LABEL_EXTENSION = "cls"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(RuntimeError):
    """Too many corrupt samples or unreadable shards, or a dataset that is not in the shard format."""


class DatasetError(DataError, ValueError):
    """A dataset that is missing, not in the shard format, or cannot be trained on as asked (no images, one
    class, labels outside its class map, splits or a model that disagree on the classes): raised by
    :func:`read_dataset_index` and :func:`check_dataset` before training starts. A ``ValueError`` too, so
    entry points report it as the user's mistake it is, without a traceback."""


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
    mixup_alpha: float = 0.0  # > 0 enables MixUp (soft targets)
    cutmix_alpha: float = 0.0  # > 0 enables CutMix; with both, one is picked per batch
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
        for name in ("batch_size", "image_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_workers", "shuffle_buffer", "seed", "max_bad_samples", "max_bad_shards",
                     "randaugment_num_ops", "randaugment_magnitude"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        low, high = self.crop_scale
        if len(self.crop_scale) != 2 or not 0 < low <= high <= 1:
            problems.append(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            problems.append(f"crop_ratio must be (low, high) with 0 < low <= high, got {self.crop_ratio}")
        if not 0 <= self.hflip <= 1:
            problems.append(f"hflip must be a probability in [0, 1], got {self.hflip}")
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


# --- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardEntry:
    url: str  # absolute path or URL
    num_samples: int


@dataclass(frozen=True)
class SplitIndex:
    num_samples: int
    shards: tuple[ShardEntry, ...]
    counts: dict[str, int] = field(default_factory=dict)  # class name -> samples, as dataset.json lists them


@dataclass(frozen=True)
class DatasetIndex:
    """The part of ``dataset.json`` a loader needs."""

    root: str
    class_names: tuple[str, ...]
    splits: dict[str, SplitIndex] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SplitIndex:
        if name not in self.splits:
            raise DataError(f"{self.root}: no split {name!r} in {DATASET_FILE} (have {sorted(self.splits)})")
        return self.splits[name]


def _is_url(path: str) -> bool:
    return "://" in path


def _open_binary(url: str):
    if _is_url(url):
        import fsspec  # only for object stores / http; local files need nothing beyond the stdlib

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def read_dataset_index(dataset_dir: str | Path) -> DatasetIndex:
    """Load ``dataset_dir/dataset.json``; a clear error naming the file when it is not the shard format."""
    root = str(dataset_dir).rstrip("/")
    path = posixpath.join(root, DATASET_FILE) if _is_url(root) else str(Path(root) / DATASET_FILE)
    try:
        with _open_binary(path) as handle:
            doc = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found (is {root} a vitflow shard dataset?)") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    if doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, "
            f"got {doc.get('format')!r} version {doc.get('version')!r}"
        )
    try:
        class_names = tuple(str(name) for name in doc["class_names"])
        splits = {}
        for name, split in doc["splits"].items():
            shards = tuple(
                ShardEntry(url=posixpath.join(root, s["path"]) if _is_url(root) else str(Path(root) / s["path"]),
                           num_samples=int(s["num_samples"]))
                for s in split["shards"]
            )
            counts = {str(k): int(v) for k, v in split.get("counts", {}).items()}
            splits[name] = SplitIndex(num_samples=sum(s.num_samples for s in shards), shards=shards, counts=counts)
            if int(split["num_samples"]) != splits[name].num_samples:
                raise ValueError(f"split {name!r}: num_samples {split['num_samples']} != sum over its shards")
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetError(f"{path}: malformed ({type(error).__name__}: {error})") from None
    if int(doc.get("num_classes", len(class_names))) != len(class_names):
        raise DatasetError(f"{path}: num_classes {doc['num_classes']} != {len(class_names)} class names")
    return DatasetIndex(root=root, class_names=class_names, splits=splits, fingerprint=str(doc.get("fingerprint", "")))


def check_dataset(index: DatasetIndex, *, train_split: str, eval_splits: Sequence[str] = (),
                  class_names: Sequence[str] | None = None) -> None:
    """Refuse a dataset that cannot train a classifier as configured, before any training starts.

    Checks that the splits exist and hold images, that there are at least two classes and the training
    split has images of at least two, that the evaluation splits hold no class the training split lacks,
    that every label in ``manifest.parquet`` lies in the class map with the name ``dataset.json`` gives it,
    and, when ``class_names`` (the class map of the model or head being trained) is given, that it is the
    dataset's. Raises :class:`DatasetError` naming the dataset and every problem found.
    """
    problems: list[str] = []
    names = index.class_names
    if len(names) < 2:
        problems.append(f"it has {len(names)} class{'es' if len(names) != 1 else ''} {list(names)}: "
                        "a classifier needs at least 2")
    trained: set[str] | None = None
    for split in dict.fromkeys([train_split, *eval_splits]):
        if split not in index.splits:
            problems.append(f"no split {split!r} (have {sorted(index.splits)})")
            continue
        info = index.splits[split]
        if info.num_samples == 0:
            problems.append(f"split {split!r} has no images (all of its inputs were quarantined?)")
            continue
        unknown = sorted(set(info.counts) - set(names))
        if unknown:
            problems.append(f"split {split!r} counts classes that are not in its class_names: {unknown[:5]}")
        present = {name for name, count in info.counts.items() if count > 0}
        if split == train_split:
            trained = present
            if info.counts and len(present) < 2 <= len(names):
                problems.append(f"split {split!r} has images of only one class {sorted(present)}")
        elif trained is not None and info.counts and present - trained:
            problems.append(f"split {split!r} has images of classes that split {train_split!r} has none of: "
                            f"{sorted(present - trained)[:5]} (the splits' class maps differ)")
    problems += _manifest_label_problems(index)
    if class_names is not None and tuple(class_names) != names:
        problems.append(f"the model's head predicts {len(class_names)} classes {list(class_names)[:5]}, the dataset has "
                        f"{len(names)} {list(names)[:5]}: the class maps differ")
    if problems:
        raise DatasetError(f"dataset {index.root} cannot be trained on: " + "; ".join(problems))


def _manifest_label_problems(index: DatasetIndex) -> list[str]:
    """Labels of ``manifest.parquet`` (when there is one) outside the class map, or named differently."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = posixpath.join(index.root, MANIFEST_FILE) if _is_url(index.root) else str(Path(index.root) / MANIFEST_FILE)
    try:
        with _open_binary(path) as handle:
            table = pq.read_table(handle, columns=["split", "label", "label_name"])
    except FileNotFoundError:
        return []  # optional for readers (docs/FORMAT.md): shards written by other tools may lack it
    except (OSError, ValueError, KeyError) as error:
        return [f"{MANIFEST_FILE} is unreadable ({type(error).__name__}: {error})"]
    labels, count = table.column("label"), len(index.class_names)
    outside = pc.or_(pc.less(labels, 0), pc.greater_equal(labels, count))
    if pc.any(outside).as_py():
        bad = table.filter(outside)
        values = sorted(set(bad.column("label").to_pylist()))
        splits = sorted(set(bad.column("split").to_pylist()))
        return [f"{len(bad)} images of split(s) {splits} have labels {values[:5]} outside 0..{count - 1} "
                f"({count} classes): labels out of range"]
    expected = pc.take(pa.array(list(index.class_names), type=pa.string()), labels)
    renamed = pc.not_equal(expected, table.column("label_name"))
    if pc.any(renamed).as_py():
        row = table.filter(renamed).slice(0, 1).to_pylist()[0]
        return [f"label {row['label']} is {row['label_name']!r} in {MANIFEST_FILE} but "
                f"{index.class_names[row['label']]!r} in {DATASET_FILE}: the class maps differ"]
    return []


# --- transforms ----------------------------------------------------------------------------------


def train_transform(config: DataConfig) -> v2.Transform:
    """Per image, on (3, H, W) uint8: crop, flip, optional RandAugment, then float + normalise."""
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(config.image_size, scale=config.crop_scale, ratio=config.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(config.hflip),
    ]
    if config.randaugment:
        steps.append(v2.RandAugment(num_ops=config.randaugment_num_ops, magnitude=config.randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.mean, config.std)]
    return v2.Compose(steps)


def eval_transform(config: DataConfig) -> v2.Transform:
    """Resize the shorter side to ``image_size / crop_pct``, center-crop ``image_size``, normalise."""
    resize = int(round(config.image_size / config.crop_pct))
    return v2.Compose([
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(config.image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(config.mean, config.std),
    ])


def batch_transform(config: DataConfig, num_classes: int) -> v2.Transform | None:
    """MixUp / CutMix on a whole batch: int labels (B,) -> soft targets (B, K); ``None`` when both are off."""
    choices = []
    if config.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


# --- the epoch plan ------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation: the same on every rank and worker for one (seed, epoch)."""
    order = list(range(num_shards))
    random.Random(derive_seed(seed, epoch, 0x5A4D)).shuffle(order)
    return order


def role_batches(num_batches: int, num_roles: int) -> list[int]:
    """Batches per worker role: ``num_batches // k`` each, the first ``num_batches % k`` one more. With the
    DataLoader's round-robin over workers, rank-batch i then comes from role ``i % k``."""
    return [num_batches // num_roles + (role < num_batches % num_roles) for role in range(num_roles)]


@dataclass(frozen=True)
class RoleRange:
    """One worker role's share of an epoch: ``num_samples`` positions of the cyclic sample sequence from
    ``start``, in ``num_batches`` batches."""

    start: int
    num_samples: int
    num_batches: int


def plan_epoch(num_samples: int, batch_size: int, rank: int, world_size: int, num_roles: int, *,
               train: bool, drop_last: bool = False) -> tuple[int, list[RoleRange]]:
    """(batches this rank yields, each role's range), by the rule in the module docstring."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if train:
        per_rank = world_size * batch_size
        batches = num_samples // per_rank if drop_last else -(-num_samples // per_rank)
        if batches == 0:
            raise DataError(
                f"{num_samples} samples are fewer than world_size x batch_size = {per_rank}: no full batch per rank"
            )
        rank_start, rank_samples = rank * batches * batch_size, batches * batch_size
    else:
        rank_start = rank * num_samples // world_size
        rank_samples = (rank + 1) * num_samples // world_size - rank_start
        batches = -(-rank_samples // batch_size)
    ranges, offset = [], 0
    for count in role_batches(batches, num_roles):
        samples = min(count * batch_size, rank_samples - offset)
        ranges.append(RoleRange(start=rank_start + offset, num_samples=max(samples, 0), num_batches=count))
        offset += count * batch_size
    return batches, ranges


# --- reading shards ------------------------------------------------------------------------------


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
    with _open_binary(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
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
    # PIL rather than torchvision.io (deprecated in 0.29); PIL also refuses decompression bombs.
    try:
        with Image.open(io.BytesIO(sample.members[images[0]])) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"undecodable .{images[0]} ({type(error).__name__}: {error})") from None
    return v2.functional.pil_to_tensor(image), label


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
        stream = itertools.islice(self._raw(span.start, counters), span.num_samples)
        if self.train:
            stream = self._shuffled(stream, random.Random(seed))
        stream = itertools.chain(stream, self._raw(span.start + span.num_samples, counters))
        transform = train_transform(config) if self.train else eval_transform(config)
        mix = batch_transform(config, self.num_classes) if self.train else None
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
        self.batches_per_epoch, self._ranges = plan_epoch(
            self.split_index.num_samples, config.batch_size, rank, world_size, self.num_roles,
            train=train, drop_last=config.drop_last,
        )
        self.stats = LoaderStats()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.index.class_names

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (padding included for training)."""
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
        stream = _EpochStream(shards, order, self._ranges, config=self.config, num_classes=self.num_classes,
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
