"""The on-disk contract between `pipeline` and its readers (``vit.data``, `vitflow shard verify`).

A dataset directory ``OUT`` holds (``docs/FORMAT.md`` is the full description):

- ``OUT/<split>/<split>-NNNNNN.tar``: WebDataset shards; each sample is ``<key>.<image ext>``,
  ``<key>.cls`` and ``<key>.json``.
- ``OUT/<split>/wids.json``: the split's shard index in the ``wids`` descriptor format.
- ``OUT/dataset.json``: class names, splits, shard list with sizes and checksums, config, fingerprint.
- ``OUT/manifest.parquet``: one row per sample; ``OUT/quarantine.parquet``: one row per unused input.

``OUT`` is a local folder or an object-store prefix (``s3://bucket/data``): every read and write goes
through ``pipeline.storage``, and every file is published whole (see there).

This module is the only place that knows those names and layouts.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pipeline.storage import Location

FORMAT_NAME = "vitflow-shards"
FORMAT_VERSION = 1

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.parquet"
WIDS_INDEX_FILE = "wids.json"
# Per-shard receipts that make reruns resumable; internal to the writer, readers ignore it.
WORK_DIR = ".vitflow"

MANIFEST_COLUMNS = ("key", "split", "shard", "label", "label_name", "bytes", "sha256", "width", "height", "source")
QUARANTINE_COLUMNS = ("source", "split", "reason", "detail")


class Reason(enum.StrEnum):
    """Why an input was quarantined: the fixed vocabulary of ``quarantine.parquet``'s ``reason``."""

    UNDECODABLE = "undecodable"  # a known image format whose pixel data fails to decode
    TRUNCATED = "truncated"  # the file ends before the image data does
    EMPTY = "empty"  # zero bytes
    NOT_AN_IMAGE = "not_an_image"  # no known image format (e.g. text named .jpg, a README)
    TOO_MANY_PIXELS = "too_many_pixels"  # width x height over max_pixels (decompression-bomb guard)
    UNKNOWN_LABEL = "unknown_label"  # no class folder, a label outside the class list, or a null label
    UNREADABLE_PATH = "unreadable_path"  # missing, unreadable or not a regular file
    PATH_ESCAPES_ROOT = "path_escapes_root"  # a manifest-table path that resolves outside the table's folder


class Rejected(Exception):
    """An input that cannot be used: ``reason`` goes to ``quarantine.parquet``, ``detail`` explains."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def shard_name(split: str, index: int) -> str:
    """The shard's path relative to ``OUT``: ``<split>/<split>-NNNNNN.tar``."""
    return f"{split}/{split}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    counts: Mapping[str, int]  # class name -> samples
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class DatasetInfo:
    """``dataset.json``, loaded and checked. What a reader needs to build its input pipeline."""

    root: str  # an absolute local path or a URI
    class_names: tuple[str, ...]
    splits: Mapping[str, SplitInfo]
    config: Mapping[str, Any]
    fingerprint: str
    source: Mapping[str, Any]
    created_by: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths (or URIs) of the split's shards, in order."""
        if split not in self.splits:
            raise KeyError(f"{self.root}: no split {split!r} (have {sorted(self.splits)})")
        return [(Location(self.root) / shard.path).uri for shard in self.splits[split].shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "splits": {
                name: {
                    "num_samples": split.num_samples,
                    "counts": dict(split.counts),
                    "shards": [
                        {"path": s.path, "num_samples": s.num_samples, "bytes": s.bytes, "sha256": s.sha256}
                        for s in split.shards
                    ],
                }
                for name, split in self.splits.items()
            },
            "config": dict(self.config),
            "fingerprint": self.fingerprint,
            "source": dict(self.source),
            "created_by": self.created_by,
        }


def fingerprint(splits: Mapping[str, SplitInfo], class_names: Sequence[str], config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of shard checksums (split order, shard order), class names and config."""
    payload = {
        "shards": {name: [s.sha256 for s in split.shards] for name, split in sorted(splits.items())},
        "class_names": list(class_names),
        "config": dict(config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def load_dataset_info(root: str | os.PathLike[str] | Location) -> DatasetInfo:
    """Read ``root/dataset.json``; raises ``ValueError`` naming the file when it is not this format."""
    root = root if isinstance(root, Location) else Location(root)
    path = root / DATASET_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (is {root} a vitflow dataset?)") from None
    except OSError as error:  # an unreachable store, a permission refused
        raise path.error("read it", error) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if doc.get("format") != FORMAT_NAME or doc.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: expected format {FORMAT_NAME!r} version {FORMAT_VERSION}, "
            f"got {doc.get('format')!r} version {doc.get('version')!r}"
        )
    try:
        splits = {
            name: SplitInfo(
                num_samples=int(split["num_samples"]),
                counts={str(k): int(v) for k, v in split["counts"].items()},
                shards=tuple(
                    ShardInfo(str(s["path"]), int(s["num_samples"]), int(s["bytes"]), str(s["sha256"]))
                    for s in split["shards"]
                ),
            )
            for name, split in doc["splits"].items()
        }
        info = DatasetInfo(
            root=root.uri,
            class_names=tuple(doc["class_names"]),
            splits=splits,
            config=doc["config"],
            fingerprint=doc["fingerprint"],
            source=doc.get("source", {}),
            created_by=doc.get("created_by", ""),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: malformed ({type(error).__name__}: {error})") from None
    if doc.get("num_classes") != info.num_classes:
        raise ValueError(f"{path}: num_classes {doc.get('num_classes')} != {info.num_classes} class names")
    return info


def file_sha256(path: str | os.PathLike[str] | Location) -> str:
    """The sha256 of a file's bytes (streamed: any size, local or in an object store)."""
    return (path if isinstance(path, Location) else Location(path)).sha256()


def write_json(path: Location, doc: Any) -> None:
    """Write JSON whole (see ``Location.writing``): readers never see half a file."""
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def write_dataset_info(info: DatasetInfo) -> None:
    write_json(Location(info.root) / DATASET_FILE, info.to_json())


def write_wids_index(root: Location, split: str, shards: Sequence[ShardInfo]) -> None:
    """``OUT/<split>/wids.json``: lets ``wids.ShardListDataset`` open the split; URLs relative to it."""
    doc = {
        "wids_version": 1,
        "name": split,
        "shardlist": [{"url": PurePosixPath(s.path).name, "nsamples": s.num_samples, "filesize": s.bytes} for s in shards],
    }
    write_json(root / split / WIDS_INDEX_FILE, doc)


def _manifest_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("split", pa.string()),
            ("shard", pa.string()),
            ("label", pa.int64()),
            ("label_name", pa.string()),
            ("bytes", pa.int64()),
            ("sha256", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("source", pa.string()),
        ]
    )


def _quarantine_schema():
    import pyarrow as pa

    return pa.schema(
        [("source", pa.string()), ("split", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
    )


def _write_rows(path: Location, rows: Sequence[Mapping[str, Any]], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
    with path.writing() as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_manifest(root: Location, shards_rows: Iterable[Sequence[Mapping[str, Any]]], *,
                   row_group_rows: int = 65_536) -> int:
    """``manifest.parquet`` from each shard's rows in order, streamed: only one row group is held in
    memory, however many samples there are. Returns the number of rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _manifest_schema()
    written, pending = 0, []
    with (root / MANIFEST_FILE).writing() as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for rows in shards_rows:
                pending.append(pa.Table.from_pylist([dict(r) for r in rows], schema=schema))
                if sum(len(t) for t in pending) >= row_group_rows:
                    writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
                    written += sum(len(t) for t in pending)
                    pending = []
            if pending or not written:
                writer.write_table(pa.concat_tables(pending) if pending else schema.empty_table())
                written += sum(len(t) for t in pending)
    return written


def write_quarantine(root: Location, rows: Sequence[Mapping[str, Any]]) -> None:
    _write_rows(root / QUARANTINE_FILE, rows, _quarantine_schema())


def _read_table(root: str | os.PathLike[str] | Location, name: str, schema):
    import pyarrow.parquet as pq

    path = (root if isinstance(root, Location) else Location(root)) / name
    return pq.read_table(path.path, filesystem=path.fs, schema=schema)


def read_manifest(root: str | os.PathLike[str] | Location):
    """``manifest.parquet`` as a ``pyarrow.Table`` (columns :data:`MANIFEST_COLUMNS`)."""
    return _read_table(root, MANIFEST_FILE, _manifest_schema())


def read_quarantine(root: str | os.PathLike[str] | Location):
    """``quarantine.parquet`` as a ``pyarrow.Table`` (columns :data:`QUARANTINE_COLUMNS`)."""
    return _read_table(root, QUARANTINE_FILE, _quarantine_schema())
