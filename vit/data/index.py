"""The dataset index: ``dataset.json`` (splits, their shards and sample counts, the class map) read and
checked, and ``manifest.parquet``'s labels checked against it, before any training starts.

Reads the on-disk contract that ``pipeline`` writes (``docs/FORMAT.md``); ``vit`` reads that format
itself and never imports ``pipeline``.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_NAME = "vitflow-shards"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
READ_AHEAD = 8 << 20  # bytes per request when streaming a shard from an object store


class DataError(RuntimeError):
    """Too many corrupt samples or unreadable shards, or a dataset that is not in the shard format."""


class DatasetError(DataError, ValueError):
    """A dataset that is missing, not in the shard format, or cannot be trained on as asked (no images, one
    class, labels outside its class map, splits or a model that disagree on the classes): raised by
    :func:`read_dataset_index` and :func:`check_dataset` before training starts. A ``ValueError`` too, so
    entry points report it as the user's mistake it is, without a traceback."""


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


def is_url(path: str) -> bool:
    """An object-store or http URL rather than a local path."""
    return "://" in path


def open_binary(url: str, *, seekable: bool = False):
    """A local path or a URL, opened for binary reading: object stores through ``pyarrow.fs`` (s3://,
    gs://, hdfs://; endpoint and credentials from the standard environment, e.g. ``AWS_ENDPOINT_URL``),
    other schemes through fsspec. The same rule as ``pipeline.storage``, which ``vit`` does not import.
    ``seekable`` for random access (Parquet); otherwise a stream read ahead in large blocks (an object
    store answers each read with a request: tar's 10 KB reads must not each become one)."""
    if not is_url(url):
        return open(url, "rb")
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(url)
    except pa.ArrowInvalid:  # a scheme pyarrow has no filesystem for
        import fsspec

        return fsspec.open(url, "rb").open()
    if seekable:
        return fs.open_input_file(path)
    return fs.open_input_stream(path, compression=None, buffer_size=READ_AHEAD)


def read_dataset_index(dataset_dir: str | Path) -> DatasetIndex:
    """Load ``dataset_dir/dataset.json``; a clear error naming the file when it is not the shard format."""
    root = str(dataset_dir).rstrip("/")
    path = posixpath.join(root, DATASET_FILE) if is_url(root) else str(Path(root) / DATASET_FILE)
    try:
        with open_binary(path) as handle:
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
                ShardEntry(url=posixpath.join(root, s["path"]) if is_url(root) else str(Path(root) / s["path"]),
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


def class_map_problem(predicts: Sequence[str], has: Sequence[str], model: str, data: str) -> str | None:
    """The one check that a model's head and the data it meets share a class map (same classes, same order:
    index i is the same class to both), worded the same wherever it is made: None when they agree."""
    if list(predicts) == list(has):
        return None
    return (f"{model} predicts {len(predicts)} classes {list(predicts)[:5]}, {data} has {len(has)} {list(has)[:5]}: "
            f"the class maps differ")


def check_class_map(predicts: Sequence[str], has: Sequence[str], model: str, data: str) -> None:
    """:func:`class_map_problem` as a :class:`DatasetError`."""
    if problem := class_map_problem(predicts, has, model, data):
        raise DatasetError(problem)


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
    if class_names is not None and (problem := class_map_problem(class_names, names, "the model's head", "the dataset")):
        problems.append(problem)
    if problems:
        raise DatasetError(f"dataset {index.root} cannot be trained on: " + "; ".join(problems))


def _manifest_label_problems(index: DatasetIndex) -> list[str]:
    """Labels of ``manifest.parquet`` (when there is one) outside the class map, or named differently."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = posixpath.join(index.root, MANIFEST_FILE) if is_url(index.root) else str(Path(index.root) / MANIFEST_FILE)
    try:
        with open_binary(path, seekable=True) as handle:
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
