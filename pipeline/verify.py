"""Check a sharded dataset against its own records: ``vitflow shard verify``.

Needs only the standard library and pyarrow (no torch, no Ray), so it runs anywhere the shards are.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import manifest
from pipeline.manifest import ShardInfo
from pipeline.storage import Location


@dataclass(frozen=True)
class DamagedShard:
    path: str
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    root: str  # an absolute local path or a URI
    num_shards: int
    num_samples: int
    damaged: tuple[DamagedShard, ...]
    problems: tuple[str, ...]  # dataset-level: fingerprint, manifest or count disagreements

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.problems


# What a sample may hold (docs/FORMAT.md): its label, its metadata and one image.
_MEMBER_EXTENSIONS = frozenset({"cls", "json", "jpg", "jpeg", "png", "webp"})


class _Hashing(io.RawIOBase):
    """A read-only stream that hashes what passes through it: one pass checks the checksum and the tar."""

    def __init__(self, stream) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        return len(data)


def _check_shard(path: Location, expected: ShardInfo, rows: Sequence[Mapping[str, Any]]) -> str | None:
    try:
        size = path.size()
    except FileNotFoundError:
        return "missing"
    if size != expected.bytes:
        return f"{size} bytes, expected {expected.bytes}"
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    problem = None
    try:
        with path.open() as stream:
            hashing = _Hashing(stream)
            try:
                with tarfile.open(fileobj=io.BufferedReader(hashing, 1 << 20), mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():  # a link or folder: never followed, never part of the format
                            problem = f"member {member.name} is not a regular file"
                            break
                        key, _, extension = member.name.partition(".")
                        members[key][extension] = tar.extractfile(member).read()
            except tarfile.TarError as error:
                problem = f"not a readable tar ({error})"
            while hashing.read(1 << 20):  # the rest (the tar's end padding): the checksum covers every byte
                pass
    except OSError as error:
        return f"unreadable ({error})"
    if hashing.digest.hexdigest() != expected.sha256:  # checked first: a changed file is named as such
        return "sha256 differs from dataset.json"
    if problem is not None:
        return problem
    if len(members) != expected.num_samples:
        return f"{len(members)} samples, expected {expected.num_samples}"
    by_key = {row["key"]: row for row in rows}
    for key, files in members.items():
        foreign = sorted(ext for ext in files if ext not in _MEMBER_EXTENSIONS)
        if foreign:  # the format holds nothing else; such members are never decoded (nor unpickled)
            return f"sample {key} has members outside the format: {', '.join('.' + ext for ext in foreign)}"
        row = by_key.get(key)
        image = [data for ext, data in files.items() if ext not in ("cls", "json")]
        if row is None or len(image) != 1 or "cls" not in files or "json" not in files:
            return f"sample {key} is incomplete or not in manifest.parquet"
        if hashlib.sha256(image[0]).hexdigest() != row["sha256"] or files["cls"].strip() != str(row["label"]).encode():
            return f"sample {key} differs from manifest.parquet"
    return None


def verify_shards(out: str | os.PathLike[str]) -> VerifyReport:
    """Recompute every shard's checksum and sample count and compare with ``dataset.json`` and the manifest."""
    root = Location(out)
    root.check_bucket()  # an unreachable store or a missing bucket: said at once, not after the retry budget
    info = manifest.load_dataset_info(root)
    rows_by_shard: dict[str, list[dict[str, Any]]] = defaultdict(list)
    problems = []
    try:
        for row in manifest.read_manifest(root).to_pylist():
            rows_by_shard[row["shard"]].append(row)
    except OSError as error:
        problems.append(f"{manifest.MANIFEST_FILE}: unreadable ({error})")
    damaged, num_shards, num_samples = [], 0, 0
    for split_name, split in info.splits.items():
        if (
            sum(s.num_samples for s in split.shards) != split.num_samples
            or sum(split.counts.values()) != split.num_samples
        ):
            problems.append(f"split {split_name}: shard and class counts do not add up to {split.num_samples}")
        for shard in split.shards:
            num_shards += 1
            num_samples += shard.num_samples
            rows = rows_by_shard.get(shard.path, [])
            if len(rows) != shard.num_samples:
                problems.append(
                    f"{manifest.MANIFEST_FILE}: {len(rows)} rows for {shard.path}, expected {shard.num_samples}"
                )
            problem = _check_shard(root / shard.path, shard, rows)
            if problem is not None:
                damaged.append(DamagedShard(shard.path, problem))
    if manifest.fingerprint(info.splits, info.class_names, info.config) != info.fingerprint:
        problems.append("fingerprint does not match the shard checksums, class names and config")
    return VerifyReport(info.root, num_shards, num_samples, tuple(damaged), tuple(problems))
