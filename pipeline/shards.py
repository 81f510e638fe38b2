"""Plan shards and write them: each task a whole shard, atomically and deterministically.

The plan is a pure function of the source listing and the config: sample keys come from the split
and the input's identity, the order from a seeded shuffle of the key-sorted inputs, shard boundaries
from the counts. Nothing depends on timing or worker count, so any number of workers, and any rerun,
writes the same bytes. A rerun reuses a shard only when its receipt (``OUT/.vitflow/``) was made for
the same plan and the file still has the recorded sha256; everything else is rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from pipeline import manifest, parallel
from pipeline.config import ShardConfig
from pipeline.images import ProcessedImage, process_image
from pipeline.manifest import DatasetInfo, Reason, Rejected, ShardInfo, SplitInfo
from pipeline.report import ShardProgress
from pipeline.sources import Record, Scan, Source, SourceError, Unusable, open_source
from pipeline.storage import Location, StorageError

# Per sample: three 512-byte tar headers, three members padded to 512 bytes (on average 256 each),
# and the JSON member itself. Added to the input size when planning shard sizes.
TAR_OVERHEAD_PER_SAMPLE = 3 * 512 + 3 * 256 + 256
KEY_HEX_DIGITS = 24  # 96 bits of sha1: collisions are not a concern below billions of samples
_SHARD_FILE = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar$")


def _storage_error(out: Location, what: str, error: OSError) -> StorageError:
    """``OUT`` cannot be written (a read-only folder, a full disk, a quota, a missing bucket): the message
    names it and the cause; what was finished stays valid (whole files only), so the same run resumes."""
    return StorageError(
        f"{out.error('write ' + what, error)}. Fix the storage (permissions, free space, quota, bucket) and run "
        "the same command again: finished shards are kept and reused"
    )


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlannedShard:
    split: str
    index: int
    keys: tuple[str, ...]
    records: tuple[Record, ...]
    digest: str  # sha256 of everything that decides this shard's bytes; stored in its receipt

    @property
    def path(self) -> str:
        return manifest.shard_name(self.split, self.index)


@dataclass(frozen=True)
class Plan:
    class_names: tuple[str, ...]
    shards: tuple[PlannedShard, ...]
    rejected: tuple[Unusable, ...]  # inputs quarantined while listing
    num_inputs: int  # records planned + rejected: what conservation is checked against


def sample_key(split: str, identity: str) -> str:
    """Stable, unique within a dataset, no dots (WebDataset splits member names at the first dot)."""
    return hashlib.sha1(f"{split}\0{identity}".encode()).hexdigest()[:KEY_HEX_DIGITS]


def shard_count(num_samples: int, bytes_per_sample: float, config: ShardConfig) -> int:
    """How many shards a split of ``num_samples`` gets.

    The fewest shards that respect ``target_shard_bytes`` and ``max_shard_samples``, rounded up to a
    multiple of ``shard_multiple`` so that any ranks x loader workers dividing it read equally many
    shards; never more shards than samples (then the largest multiple that fits, or the minimum).
    """
    if num_samples == 0:
        return 0
    needed = math.ceil(num_samples * bytes_per_sample / config.target_shard_bytes)
    if config.max_shard_samples is not None:
        needed = max(needed, math.ceil(num_samples / config.max_shard_samples))
    needed = min(max(needed, 1), num_samples)
    multiple = config.shard_multiple
    count = math.ceil(needed / multiple) * multiple
    if count > num_samples:
        count = max(needed, num_samples // multiple * multiple)
    return count


def _seeded_shuffle(items: list[Any], seed: int, purpose: str) -> list[Any]:
    items = list(items)
    random.Random(f"{seed}/{purpose}").shuffle(items)  # str seeds hash deterministically (sha512)
    return items


def plan_shards(scan: Scan, config: ShardConfig) -> Plan:
    by_split: dict[str, list[Record]] = defaultdict(list)
    for record in sorted(scan.records, key=lambda r: (r.split, r.source, r.row)):
        by_split[record.split].append(record)
    if config.limit is not None:
        by_split = {s: _seeded_shuffle(rs, config.seed, f"limit/{s}")[: config.limit] for s, rs in by_split.items()}
    if config.val_fraction > 0:
        by_split = _carve_validation(by_split, config)

    bytes_per_sample = scan.mean_bytes + TAR_OVERHEAD_PER_SAMPLE
    config_doc = config.model_dump(mode="json")
    shards = []
    for split in sorted(by_split):
        seen: Counter[str] = Counter()
        keyed = []
        for record in by_split[split]:
            # A table may list the same input twice; the second copy gets its own key.
            seen[record.source] += 1
            identity = record.source if seen[record.source] == 1 else f"{record.source}#copy{seen[record.source]}"
            keyed.append((sample_key(split, identity), record))
        keyed = _seeded_shuffle(sorted(keyed, key=lambda kr: kr[0]), config.seed, f"order/{split}")
        count = shard_count(len(keyed), bytes_per_sample, config)
        base, extra = divmod(len(keyed), count)
        start = 0
        for index in range(count):
            size = base + (1 if index < extra else 0)  # sizes differ by at most one
            chunk = keyed[start : start + size]
            start += size
            keys = tuple(k for k, _ in chunk)
            records = tuple(r for _, r in chunk)
            digest_doc = {
                "path": manifest.shard_name(split, index),
                "config": config_doc,
                "class_names": list(scan.class_names),
                "samples": [[k, r.source, r.label] for k, r in chunk],
            }
            digest = hashlib.sha256(json.dumps(digest_doc, sort_keys=True).encode()).hexdigest()
            shards.append(PlannedShard(split, index, keys, records, digest))
    num_planned = sum(len(rs) for rs in by_split.values())
    return Plan(scan.class_names, tuple(shards), tuple(scan.rejected), num_planned + len(scan.rejected))


def _carve_validation(by_split: dict[str, list[Record]], config: ShardConfig) -> dict[str, list[Record]]:
    if "val" in by_split:
        raise ValueError("the source already has a 'val' split; set val_fraction to 0 to use it")
    by_class: dict[int, list[Record]] = defaultdict(list)
    for record in by_split.get("train", []):
        by_class[record.label].append(record)
    train, val = [], []
    for label in sorted(by_class):
        members = _seeded_shuffle(by_class[label], config.seed, f"val/{label}")
        take = round(len(members) * config.val_fraction)  # per class: the split is stratified
        val += [dataclasses.replace(r, split="val") for r in members[:take]]
        train += members[take:]
    return {**by_split, "train": train, "val": val}


# --------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class ShardTask:
    """Everything one task needs to write one shard; pickled into Ray tasks."""

    shard: PlannedShard
    source: Source
    out: str
    config: ShardConfig
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard task hands back: small, whatever the shard holds. Its manifest and quarantine rows stay
    in its receipt, which the driver streams into the manifests at the end: the driver's memory does not
    grow with the images sharded (``benchmarks/shard_load.py``)."""

    info: ShardInfo
    counts: Mapping[str, int]  # label name -> samples in the shard
    quarantined: int  # inputs of this shard that were quarantined
    reused: bool


def _outcome(receipt: Mapping[str, Any], reused: bool) -> ShardOutcome:
    counts = Counter(row["label_name"] for row in receipt["samples"])
    return ShardOutcome(ShardInfo(**receipt["shard"]), dict(counts), len(receipt["quarantined"]), reused)


def _receipt_path(out: Location, shard: PlannedShard) -> Location:
    return out / manifest.WORK_DIR / f"{shard.split}-{shard.index:06d}.json"


def _reusable(task: ShardTask) -> ShardOutcome | None:
    out = Location(task.out)
    try:
        receipt = json.loads(_receipt_path(out, task.shard).read_text())
        path = out / task.shard.path
        if receipt["digest"] != task.shard.digest or path.size() != receipt["shard"]["bytes"]:
            return None
        if path.sha256() != receipt["shard"]["sha256"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return _outcome(receipt, reused=True)


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the same content always makes the same bytes, whoever writes it, whenever.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def build_shard(task: ShardTask, report: Callable[[int], None]) -> ShardOutcome:
    """Write one shard, or reuse it when an earlier run left a verified one; the body of a shard task.

    ``report(n)`` is told every so often how many more inputs were handled.
    """
    reused = _reusable(task)
    if reused is not None:
        report(len(task.shard.records))
        return reused
    # Parallelism is across shards; torch's intra-op threads on one small image only contend for the
    # same cores (measured 2x slower with 2 threads on 2 busy cores). Ray tasks already get 1 thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(task, report)
    finally:
        torch.set_num_threads(threads)


def _quarantine_row(record: Record, reason: Reason, detail: str) -> dict[str, Any]:
    return {"source": record.source, "split": record.split, "reason": str(reason), "detail": detail}


def _add_sample(
    tar: tarfile.TarFile, key: str, record: Record, image: ProcessedImage, task: ShardTask
) -> dict[str, Any]:
    """Append the sample's members (sorted by extension) and return its manifest row."""
    label_name = task.class_names[record.label]
    meta = {
        "source": record.source,
        "width": image.width,
        "height": image.height,
        "label": record.label,
        "label_name": label_name,
    }
    members = {
        "cls": str(record.label).encode("ascii"),
        image.extension: image.data,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }
    for extension in sorted(members):
        data = members[extension]
        tar.addfile(_tar_member(f"{key}.{extension}", len(data)), io.BytesIO(data))
    return {
        "key": key,
        "split": record.split,
        "shard": task.shard.path,
        "label": record.label,
        "label_name": label_name,
        "bytes": len(image.data),
        "sha256": hashlib.sha256(image.data).hexdigest(),
        "width": image.width,
        "height": image.height,
        "source": record.source,
    }


def _build(task: ShardTask, report: Callable[[int], None]) -> ShardOutcome:
    shard, out = task.shard, Location(task.out)
    final = out / shard.path
    published = False
    try:
        # Built in a local temporary file, then published whole (a rename, or one upload to an object
        # store): readers and reruns see the whole shard or none. Its receipt, written after, is what
        # makes it "done"; a shard without one is rebuilt.
        with final.writing() as tmp:
            samples, quarantined = _write_tar(tmp, task, report)
            info = ShardInfo(shard.path, len(samples), tmp.stat().st_size, manifest.file_sha256(tmp))
        published = True
        receipt = {
            "digest": shard.digest,
            "shard": dataclasses.asdict(info),
            "samples": samples,
            "quarantined": quarantined,
        }
        manifest.write_json(_receipt_path(out, shard), receipt)
        outcome = _outcome(receipt, reused=False)
    except BaseException as error:  # a full disk, a cancelled task: no half-written shard left to fill it
        if published:  # whole, but without its receipt it would only be rebuilt: give its space back
            with contextlib.suppress(OSError):
                final.delete()
        if isinstance(error, OSError):  # only writes raise OSError here: source reads fail as SourceError
            raise _storage_error(out, shard.path, error) from error
        raise
    return outcome


def _write_tar(
    tmp: Path, task: ShardTask, report: Callable[[int], None]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The shard's samples into ``tmp``, fsynced; its manifest and quarantine rows."""
    shard, config = task.shard, task.config
    options = {
        "max_size": config.max_size,
        "quality": config.jpeg_quality,
        "max_pixels": config.max_pixels,
        "keep_formats": frozenset(config.keep_formats),
        "resample": config.resample,
    }
    samples, quarantined, pending, last_report = [], [], 0, time.monotonic()
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, (record, data) in zip(shard.keys, _read_source(task), strict=True):
            try:
                if isinstance(data, Rejected):  # the source could not read it
                    raise data
                image = process_image(data, **options)
            except Rejected as rejected:
                quarantined.append(_quarantine_row(record, rejected.reason, rejected.detail))
            except Exception as error:  # a bad image never stops the job, whatever the decoder raises
                quarantined.append(_quarantine_row(record, Reason.UNDECODABLE, f"{type(error).__name__}: {error}"))
            else:
                samples.append(_add_sample(tar, key, record, image, task))
            pending += 1
            if pending >= 64 or time.monotonic() - last_report > 0.5:
                report(pending)
                pending, last_report = 0, time.monotonic()
        tar.close()
        f.flush()
        os.fsync(f.fileno())
    report(pending)
    return samples, quarantined


def _read_source(task: ShardTask) -> Iterator[tuple[Record, bytes | Rejected]]:
    """The source's records for this shard; a source that fails as a whole is a ``SourceError``, so that
    every ``OSError`` while building a shard is one of writing it."""
    try:
        yield from task.source.read(task.shard.records)
    except OSError as error:
        raise SourceError(f"{task.source.uri}: reading inputs for {task.shard.path} failed: {error}") from error


@dataclass(frozen=True)
class ShardResult:
    info: DatasetInfo
    num_inputs: int
    num_sharded: int
    quarantined: Mapping[str, int]  # reason -> inputs
    built: tuple[str, ...]  # shard paths written by this run
    reused: tuple[str, ...]  # shard paths verified and kept from an earlier run
    seconds: float

    @property
    def num_quarantined(self) -> int:
        return sum(self.quarantined.values())

    @property
    def images_per_second(self) -> float:
        return self.num_inputs / self.seconds if self.seconds > 0 else 0.0


def _version() -> str:
    try:
        return metadata.version("vitflow")
    except metadata.PackageNotFoundError:
        return "unknown"


def _reasons_text(reasons: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items())) or "none quarantined"


def _inputs_text(num_inputs: int, rejected: Sequence[Unusable]) -> str:
    if not num_inputs:
        return "the source lists no inputs"
    return f"{num_inputs} inputs, all quarantined: {_reasons_text(Counter(str(u.reason) for u in rejected))}"


# Written when OUT is first prepared: marks it as a vitflow dataset (finished or not) and proves it writable.
_WRITER_FILE = "writer.json"


def _prepare_out(out: Location) -> None:
    out.check_bucket()
    work = out / manifest.WORK_DIR
    is_dataset = (out / manifest.DATASET_FILE).exists() or work.is_dir()
    if out.is_file():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.children() and not is_dataset:
        raise ValueError(f"{out}: not empty and not a vitflow dataset; choose a new or empty folder")
    work.mkdir()
    # Until the run finishes, no dataset.json: readers never see one that disagrees with the shards.
    (out / manifest.DATASET_FILE).delete()
    # A rerun into a folder that has become read-only (or a bucket that does not exist) fails here, not in
    # the first shard task.
    manifest.write_json(work / _WRITER_FILE, {"created_by": f"vitflow {_version()}"})


def _remove_stale(out: Location, plan: Plan) -> None:
    """Shards, receipts and temporary files of an earlier plan that this one does not produce."""
    wanted = {shard.path for shard in plan.shards}
    receipts = {_receipt_path(out, shard).name for shard in plan.shards} | {_WRITER_FILE}
    for directory in [p for p in out.children() if p.is_dir() and p.name != manifest.WORK_DIR]:
        for file in directory.children():
            relative = f"{directory.name}/{file.name}"
            if (_SHARD_FILE.match(file.name) and relative not in wanted) or ".tar.tmp-" in file.name:
                file.delete()
        if not any(s.split == directory.name for s in plan.shards):
            (directory / manifest.WIDS_INDEX_FILE).delete()
    for receipt in (out / manifest.WORK_DIR).children():
        if receipt.name not in receipts:
            receipt.delete()


def write_shards(
    source: Source | str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: ShardConfig | None = None,
    *,
    workers: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> ShardResult:
    """Shard ``source`` into ``out`` (see ``docs/FORMAT.md``); resumes when ``out`` holds an earlier run.

    ``workers``: shard tasks running at once; by default the Ray cluster's CPUs, followed as nodes join,
    with more tasks queued for an autoscaler to see (``pipeline/parallel.py``); 0 runs them in this process
    without Ray. ``address``: a Ray cluster to use; without it a local Ray is started with ``workers`` CPUs
    (or the one already initialised in this process is used).
    """
    started = time.perf_counter()
    config = config or ShardConfig()
    if not hasattr(source, "scan"):
        source = open_source(str(source))
    out = Location(out)
    plan = plan_shards(source.scan(), config)  # source and config mistakes surface before OUT is touched
    if not plan.shards:
        raise SourceError(f"{source.uri}: no images to shard ({_inputs_text(plan.num_inputs, plan.rejected)})")
    try:
        _prepare_out(out)
        _remove_stale(out, plan)
    except StorageError:  # already names OUT and the cause (a missing bucket, an unreachable store)
        raise
    except OSError as error:
        raise _storage_error(out, "into the output folder", error) from error
    tasks = [ShardTask(shard, source, out.uri, config, plan.class_names) for shard in plan.shards]

    total = sum(len(t.shard.records) for t in tasks)
    with ShardProgress(total_images=total, total_shards=len(tasks), enabled=progress) as bar:
        outcomes = parallel.map_tasks(
            build_shard, tasks, workers=workers, address=address, on_progress=bar.advance, on_done=bar.shard_done
        )

    info = _assemble(out, plan, config, source, outcomes)
    quarantined = [
        {"source": u.source, "split": u.split, "reason": str(u.reason), "detail": u.detail} for u in plan.rejected
    ]

    def rows_per_shard() -> Iterator[list[dict[str, Any]]]:  # one receipt in memory at a time
        for shard in plan.shards:
            receipt = json.loads(_receipt_path(out, shard).read_text())
            quarantined.extend(receipt["quarantined"])
            yield receipt["samples"]

    num_sharded = sum(o.info.num_samples for o in outcomes)
    try:
        written = manifest.write_manifest(out, rows_per_shard())
        quarantined.sort(key=lambda q: (q["split"] or "", q["source"]))
        if written != num_sharded or written + len(quarantined) != plan.num_inputs:
            raise RuntimeError(
                f"count conservation failed: {plan.num_inputs} inputs != {written} sharded "
                f"({num_sharded} counted by the shard tasks) + {len(quarantined)} quarantined"
            )
        manifest.write_quarantine(out, quarantined)
        if not num_sharded:  # no dataset.json: an empty dataset is a mistake, not a result
            raise SourceError(
                f"{source.uri}: none of the {plan.num_inputs} inputs could be used "
                f"({_reasons_text(Counter(q['reason'] for q in quarantined))}); see {out / manifest.QUARANTINE_FILE}"
            )
        for split, split_info in info.splits.items():
            manifest.write_wids_index(out, split, split_info.shards)
        manifest.write_dataset_info(info)  # last: its presence means the dataset is complete
    except OSError as error:
        raise _storage_error(out, "the dataset's index files", error) from error
    return ShardResult(
        info=info,
        num_inputs=plan.num_inputs,
        num_sharded=num_sharded,
        quarantined=dict(sorted(Counter(q["reason"] for q in quarantined).items())),
        built=tuple(s.path for s, o in zip(plan.shards, outcomes) if not o.reused),
        reused=tuple(s.path for s, o in zip(plan.shards, outcomes) if o.reused),
        seconds=time.perf_counter() - started,
    )


def _assemble(
    out: Location, plan: Plan, config: ShardConfig, source: Source, outcomes: Sequence[ShardOutcome]
) -> DatasetInfo:
    splits = {}
    for split in sorted({s.split for s in plan.shards}):
        shard_infos = tuple(o.info for s, o in zip(plan.shards, outcomes) if s.split == split)
        labels: Counter[str] = Counter()
        for s, o in zip(plan.shards, outcomes):
            if s.split == split:
                labels.update(o.counts)
        splits[split] = SplitInfo(
            num_samples=sum(s.num_samples for s in shard_infos),
            counts={name: labels.get(name, 0) for name in plan.class_names},
            shards=shard_infos,
        )
    config_doc = config.model_dump(mode="json")
    info = DatasetInfo(
        root=out.uri,
        class_names=plan.class_names,
        splits=splits,
        config=config_doc,
        fingerprint=manifest.fingerprint(splits, plan.class_names, config_doc),
        source=source.describe(),
        created_by=f"vitflow {_version()}",
    )
    return info
