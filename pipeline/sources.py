"""Inputs: image folders, Hugging Face Parquet files and manifest tables, as records the sharder reads.

A source lists its inputs in :meth:`scan` (paths or row numbers and labels, no image bytes: cheap
even for millions of images) and reads the bytes of a batch of records in :meth:`read`, which runs
inside a shard task. Sources are frozen dataclasses that hold a URI and options only, so they pickle
into Ray tasks; each task opens its own filesystem.

Locations are local paths or URIs: whatever ``pyarrow.fs.FileSystem.from_uri`` knows (``file://``,
``s3://``, ``gs://``, ``hdfs://``), else an fsspec filesystem (``memory://``, ``http://``, ...) wrapped as
a pyarrow one.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.manifest import Reason, Rejected
from pipeline.storage import StorageError

# Split folder / file / column names we recognise, and the name each is written under.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_SAFE_SPLIT = re.compile(r"^[A-Za-z0-9_-]+$")  # split names become folder and file names


class SourceError(ValueError):
    """The source as a whole is unusable (missing, wrong layout, bad columns); the message names it."""


@dataclass(frozen=True, slots=True)
class Record:
    """One input that may become a sample."""

    split: str
    source: str  # stable identity relative to the source root; shown in manifests and hashed into the key
    label: int
    file: str  # path of the file to read, relative to the source root (the Parquet file for rows)
    row: int = -1  # row within a Parquet file; -1 for image files


@dataclass(frozen=True, slots=True)
class Unusable:
    """An input rejected while listing, before any bytes were read."""

    split: str | None  # None where the split cannot be told (a loose file at the root of a split layout)
    source: str
    reason: Reason
    detail: str


@dataclass(frozen=True)
class Scan:
    class_names: tuple[str, ...]
    records: list[Record]
    rejected: list[Unusable]
    mean_bytes: float  # mean input size of a record, for planning shard sizes


class Source(Protocol):
    kind: ClassVar[str]
    uri: str

    def scan(self) -> Scan: ...

    def read(self, records: Sequence[Record]) -> Iterator[tuple[Record, bytes | Rejected]]:
        """Bytes of each record, in the order given, or why they could not be read."""
        ...

    def describe(self) -> dict[str, Any]: ...


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding ``uri`` and the path within it (see ``pipeline.storage``)."""
    try:
        return storage.filesystem(uri)
    except StorageError as error:
        raise SourceError(str(error)) from None


def split_name(name: str) -> str | None:
    """The split a folder or file name stands for ("validation" -> "val"), or None."""
    return SPLIT_ALIASES.get(name.lower())


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _read_file(fs: pafs.FileSystem, path: str) -> bytes | Rejected:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except OSError as error:  # missing, a directory, permissions, a broken link (pyarrow's errors are OSErrors)
        return Rejected(Reason.UNREADABLE_PATH, f"{type(error).__name__}: {error}")


@dataclass(frozen=True)
class ImageFolderSource:
    """``root/<class>/<file>``, or ``root/<split>/<class>/<file>`` when every top-level folder is a split.

    Class names are the sorted class-folder names (across splits). Files may sit deeper inside a class
    folder. Hidden files and folders (a leading dot) are ignored; every other file is an input:
    outside a class folder it is quarantined as ``unknown_label``, with another extension than
    :data:`IMAGE_EXTENSIONS` as ``not_an_image``.
    """

    kind: ClassVar[str] = "folder"
    uri: str

    def scan(self) -> Scan:
        fs, root = filesystem(self.uri)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise SourceError(f"{self.uri}: not a directory")
        entries = [
            (posixpath.relpath(info.path, root), info)
            for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        ]
        entries = [(rel, info) for rel, info in entries if not _is_hidden(rel)]
        top_dirs = {rel for rel, info in entries if "/" not in rel and info.type == pafs.FileType.Directory}
        split_layout = bool(top_dirs) and all(split_name(d) for d in top_dirs)
        class_depth = 2 if split_layout else 1
        class_names = sorted(
            {
                rel.split("/")[-1]
                for rel, info in entries
                if info.type == pafs.FileType.Directory and rel.count("/") == class_depth - 1
            }
        )
        label_of = {name: i for i, name in enumerate(class_names)}
        if split_layout:
            _check_split_classes(self.uri, entries)

        records, rejected, sizes = [], [], []
        for rel, info in sorted(entries, key=lambda e: e[0]):
            if info.type == pafs.FileType.Directory:
                continue
            parts = rel.split("/")
            if split_layout:
                split, inner = (split_name(parts[0]) if len(parts) > 1 else None), parts[1:]
            else:
                split, inner = "train", parts
            if info.type != pafs.FileType.File:
                rejected.append(Unusable(split, rel, Reason.UNREADABLE_PATH, f"not a regular file ({info.type.name})"))
            elif split is None or len(inner) < 2:
                rejected.append(Unusable(split, rel, Reason.UNKNOWN_LABEL, "not inside a class folder"))
            elif posixpath.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
                rejected.append(
                    Unusable(
                        split,
                        rel,
                        Reason.NOT_AN_IMAGE,
                        f"extension {posixpath.splitext(rel)[1]!r} is not an image type",
                    )
                )
            else:
                records.append(Record(split, rel, label_of[inner[0]], rel))
                sizes.append(info.size or 0)
        return Scan(tuple(class_names), records, rejected, sum(sizes) / max(1, len(sizes)))

    def read(self, records: Sequence[Record]) -> Iterator[tuple[Record, bytes | Rejected]]:
        fs, root = filesystem(self.uri)
        for record in records:
            yield record, _read_file(fs, f"{root}/{record.file}")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri}


def _check_split_classes(uri: str, entries: list[tuple[str, pafs.FileInfo]]) -> None:
    """Every class folder of val/test must exist in train: a class the model never trains on (often a
    misspelt or renamed folder) would silently get a label of its own. Train may have more classes."""
    by_split: dict[str, set[str]] = defaultdict(set)
    for rel, info in entries:
        if info.type == pafs.FileType.Directory and rel.count("/") == 1:
            by_split[split_name(rel.split("/")[0])].add(rel.split("/")[1])
    if "train" not in by_split:
        return
    for split, classes in sorted(by_split.items()):
        extra = sorted(classes - by_split["train"])
        if split != "train" and extra:
            raise SourceError(
                f"{uri}: split {split!r} has class folders that train lacks: {extra[:5]}"
                f"{' ...' if len(extra) > 5 else ''}; the splits must share one class map (rename or remove them)"
            )


@dataclass(frozen=True)
class ParquetSource:
    """Parquet in the Hugging Face image layout: ``image`` = struct<bytes, path> (or binary), ``label`` int.

    ``uri`` is one file or a folder of ``*.parquet`` files. A file's split is read from its name
    (``train-00000-of-00001.parquet`` -> train) or its folder's (``test/0000.parquet`` -> test), else
    train. Class names: ``class_names`` when given, else the ``huggingface`` schema metadata
    (``info.features.label.names``), else "0" .. "K-1".
    """

    kind: ClassVar[str] = "parquet"
    uri: str
    class_names: tuple[str, ...] | None = None

    def _files(self, fs: pafs.FileSystem, root: str) -> tuple[str, list[str]]:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return posixpath.dirname(root), [posixpath.basename(root)]
        if info.type != pafs.FileType.Directory:
            raise SourceError(f"{self.uri}: not found")
        files = sorted(
            posixpath.relpath(i.path, root)
            for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if i.type == pafs.FileType.File and i.path.endswith(".parquet")
        )
        files = [f for f in files if not _is_hidden(f)]
        if not files:
            raise SourceError(f"{self.uri}: no .parquet files")
        return root, files

    def scan(self) -> Scan:
        import pyarrow.parquet as pq

        fs, root = filesystem(self.uri)
        base, files = self._files(fs, root)
        per_file, metadata_names, total_bytes, total_rows = [], set(), 0, 0
        for file in files:
            with fs.open_input_file(f"{base}/{file}") as handle:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
                _check_image_columns(schema, f"{base}/{file}")
                if not pa.types.is_integer(schema.field("label").type):
                    raise SourceError(
                        f"{base}/{file}: column 'label' must hold integer class indices, not {schema.field('label').type}"
                    )
                labels = parquet.read(columns=["label"]).column("label").to_pylist()
                names = _hf_class_names(schema.metadata)
                if names is not None:
                    metadata_names.add(names)
                total_bytes += _column_bytes(parquet.metadata, "image")
                total_rows += len(labels)
            per_file.append((file, labels))
        if self.class_names is not None:
            class_names = tuple(self.class_names)
        elif len(metadata_names) > 1:
            raise SourceError(f"{self.uri}: files disagree on class names; give class_names explicitly")
        elif metadata_names:
            class_names = metadata_names.pop()
        else:
            top = max((label for _, labels in per_file for label in labels if label is not None), default=-1)
            class_names = tuple(str(i) for i in range(top + 1))

        records, rejected = [], []
        for file, labels in per_file:
            split = _split_of_file(file)
            for row, label in enumerate(labels):
                source = f"{file}#{row}"
                if label is None or not 0 <= label < len(class_names):
                    detail = "label is null" if label is None else f"label {label} outside 0..{len(class_names) - 1}"
                    rejected.append(Unusable(split, source, Reason.UNKNOWN_LABEL, detail))
                else:
                    records.append(Record(split, source, int(label), file, row))
        return Scan(class_names, records, rejected, total_bytes / max(1, total_rows))

    def read(self, records: Sequence[Record]) -> Iterator[tuple[Record, bytes | Rejected]]:
        import pyarrow.parquet as pq

        fs, root = filesystem(self.uri)
        base = root if fs.get_file_info(root).type == pafs.FileType.Directory else posixpath.dirname(root)
        rows_by_file: dict[str, set[int]] = defaultdict(set)
        for record in records:
            rows_by_file[record.file].add(record.row)
        found: dict[tuple[str, int], bytes | Rejected] = {}
        for file, rows in rows_by_file.items():
            try:
                with fs.open_input_file(f"{base}/{file}") as handle:
                    found.update(_read_rows(pq.ParquetFile(handle), file, sorted(rows)))
            except OSError as error:
                failure = Rejected(Reason.UNREADABLE_PATH, f"{file}: {type(error).__name__}: {error}")
                found.update({(file, row): failure for row in rows})
        for record in records:
            yield record, found[record.file, record.row]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri}


def _check_image_columns(schema: pa.Schema, where: str) -> None:
    names = schema.names
    if "image" not in names or "label" not in names:
        raise SourceError(f"{where}: expected columns 'image' and 'label' (Hugging Face image layout), found {names}")
    image = schema.field("image").type
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image)) and not (
        pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
    ):
        raise SourceError(f"{where}: column 'image' must be struct<bytes, path> or binary, not {image}")


def _hf_class_names(metadata: dict[bytes, bytes] | None) -> tuple[str, ...] | None:
    import json

    if not metadata or b"huggingface" not in metadata:
        return None
    try:
        doc = json.loads(metadata[b"huggingface"])
    except json.JSONDecodeError:
        return None
    features = doc.get("info", {}).get("features") or doc.get("features") or {}
    names = features.get("label", {}).get("names")
    return tuple(str(n) for n in names) if names else None


def _column_bytes(metadata, column: str) -> int:
    """Uncompressed bytes of a (possibly nested) column, from the footer alone."""
    total = 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] == column:
                total += chunk.total_uncompressed_size
    return total


def _split_of_file(file: str) -> str:
    parts = file.split("/")
    stem = parts[-1].removesuffix(".parquet")
    # "train-00000-of-00001", "test_0", "validation.parquet"
    candidates = [re.split(r"[-_.]", stem)[0], *reversed(parts[:-1])]
    for candidate in candidates:
        if split_name(candidate):
            return split_name(candidate)
    return "train"


def _read_rows(parquet, file: str, rows: list[int]) -> dict[tuple[str, int], bytes | Rejected]:
    """Read only the row groups holding ``rows`` (sorted), one group at a time to bound memory."""
    import pyarrow.compute as pc

    out: dict[tuple[str, int], bytes | Rejected] = {}
    start, i = 0, 0
    for g in range(parquet.metadata.num_row_groups):
        end = start + parquet.metadata.row_group(g).num_rows
        local = []
        while i < len(rows) and rows[i] < end:
            local.append(rows[i] - start)
            i += 1
        if local:
            column = parquet.read_row_group(g, columns=["image"]).column("image").combine_chunks()
            if pa.types.is_struct(column.type):
                column = pc.struct_field(column, "bytes")
            for offset, value in zip(local, column.take(pa.array(local)).to_pylist()):
                out[file, start + offset] = value if value else Rejected(Reason.EMPTY, "image bytes are null or empty")
        start = end
    for row in rows[i:]:
        out[file, row] = Rejected(Reason.UNREADABLE_PATH, f"row {row} is past the end of {file}")
    return out


@dataclass(frozen=True)
class ManifestSource:
    """A CSV or Parquet table with columns ``path`` and ``label`` (class name or index) and optional ``split``.

    Relative paths resolve against the table's folder; a path that resolves outside it (``../x.jpg``,
    an absolute path elsewhere, another URI) is quarantined as ``path_escapes_root`` and never read.
    The check is on the normalised path text; symbolic links inside the folder are followed.
    Class names: ``class_names`` when given; else the sorted distinct names, or "0" .. "K-1" for indices.
    """

    kind: ClassVar[str] = "manifest"
    uri: str
    class_names: tuple[str, ...] | None = None

    def _root(self) -> tuple[pafs.FileSystem, str, str]:
        fs, path = filesystem(self.uri)
        return fs, path, posixpath.dirname(path)

    def scan(self) -> Scan:
        fs, path, root = self._root()
        table = _read_table(fs, path, self.uri)
        for column in ("path", "label"):
            if column not in table.column_names:
                raise SourceError(
                    f"{self.uri}: expected columns 'path' and 'label' (and optional 'split'), found {table.column_names}"
                )
        paths = table.column("path").to_pylist()
        labels = table.column("label").to_pylist()
        splits = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(paths)
        by_index = pa.types.is_integer(table.schema.field("label").type)
        class_names = self._class_names(labels, by_index)
        label_of = {name: i for i, name in enumerate(class_names)}

        records, rejected = [], []
        for row, (raw_path, label, raw_split) in enumerate(zip(paths, labels, splits)):
            split = self._split(raw_split, row)
            raw_path = "" if raw_path is None else str(raw_path)
            relative = _inside(root, raw_path, self.uri) if raw_path else None
            index = label if by_index else label_of.get(label)
            if not raw_path:
                rejected.append(Unusable(split, f"row {row}", Reason.UNREADABLE_PATH, "empty path"))
            elif relative is None:
                rejected.append(Unusable(split, raw_path, Reason.PATH_ESCAPES_ROOT, f"resolves outside {root}"))
            elif index is None or not 0 <= index < len(class_names):
                rejected.append(
                    Unusable(
                        split,
                        relative,
                        Reason.UNKNOWN_LABEL,
                        f"label {label!r} is not one of the {len(class_names)} classes",
                    )
                )
            else:
                records.append(Record(split, relative, int(index), relative))
        return Scan(class_names, records, rejected, _mean_size(fs, root, records))

    def _class_names(self, labels: list[Any], by_index: bool) -> tuple[str, ...]:
        if self.class_names is not None:
            return tuple(self.class_names)
        if by_index:
            return tuple(str(i) for i in range(max((x for x in labels if x is not None), default=-1) + 1))
        return tuple(sorted({str(x) for x in labels if x not in (None, "")}))

    def _split(self, raw: Any, row: int) -> str:
        if raw in (None, ""):
            return "train"
        name = split_name(str(raw)) or str(raw)
        if not _SAFE_SPLIT.match(name):
            raise SourceError(f"{self.uri}: row {row}: split {raw!r} must be letters, digits, '_' or '-'")
        return name

    def read(self, records: Sequence[Record]) -> Iterator[tuple[Record, bytes | Rejected]]:
        fs, _, root = self._root()
        for record in records:
            yield record, _read_file(fs, f"{root}/{record.file}")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri}


def _read_table(fs: pafs.FileSystem, path: str, uri: str) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as handle:
            if path.lower().endswith(".parquet"):
                return pq.read_table(handle)
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
            return pcsv.read_csv(handle, parse_options=pcsv.ParseOptions(delimiter=delimiter))
    except FileNotFoundError:
        raise SourceError(f"{uri}: not found") from None
    except (OSError, pa.ArrowInvalid) as error:
        raise SourceError(f"{uri}: cannot read the table ({error})") from None


def _inside(root: str, path: str, uri: str) -> str | None:
    """``path`` relative to ``root`` if it stays inside it, else None."""
    if "://" in path:
        prefix = uri[: uri.index("://") + 3]
        if not path.startswith(prefix):
            return None
        path = filesystem(path)[1]
    joined = posixpath.normpath(path if path.startswith("/") else posixpath.join(root, path))
    if not joined.startswith(root.rstrip("/") + "/"):
        return None
    return posixpath.relpath(joined, root)


def _mean_size(fs: pafs.FileSystem, root: str, records: Sequence[Record], sample: int = 256) -> float:
    # A few hundred stat calls give a good enough mean for planning, even on object stores.
    step = max(1, len(records) // sample)
    infos = fs.get_file_info([f"{root}/{r.file}" for r in records[::step]])
    sizes = [i.size for i in infos if i.type == pafs.FileType.File and i.size is not None]
    return sum(sizes) / max(1, len(sizes))


SourceKind = Literal["auto", "folder", "parquet", "manifest"]


def open_source(uri: str, kind: SourceKind = "auto", class_names: Sequence[str] | None = None) -> Source:
    """The source at ``uri``; ``kind="auto"`` tells the three apart by layout and columns."""
    uri = str(uri)
    names = tuple(class_names) if class_names is not None else None
    if kind == "folder":
        if names is not None:
            raise SourceError(f"{uri}: an image folder takes its class names from its folders")
        return ImageFolderSource(uri)
    if kind == "parquet":
        return ParquetSource(uri, names)
    if kind == "manifest":
        return ManifestSource(uri, names)

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{uri}: not found")
    if info.type == pafs.FileType.Directory:
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        extensions = {posixpath.splitext(i.path)[1].lower() for i in listing if i.type == pafs.FileType.File}
        if ".parquet" in extensions and not extensions & IMAGE_EXTENSIONS:
            return ParquetSource(uri, names)
        return open_source(uri, "folder", class_names)
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        return ManifestSource(uri, names)
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as handle:
            columns = pq.read_schema(handle).names
        return ManifestSource(uri, names) if "path" in columns else ParquetSource(uri, names)
    raise SourceError(f"{uri}: expected an image folder, a .parquet file or folder, or a .csv/.tsv/.parquet manifest")
