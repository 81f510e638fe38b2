"""Sharding end to end, in-process (``workers=0``): round trips of real corpora read back by three readers,
the bad-file corpus, the shard-count rule, determinism, resume and verification."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import wids
from PIL import Image

from pipeline import (
    ShardConfig,
    load_dataset_info,
    read_manifest,
    read_quarantine,
    verify_shards,
    write_shards,
)
from pipeline.shards import plan_shards, shard_count
from pipeline.sources import open_source

FAST = {"workers": 0, "progress": False}


def all_files(root: str | Path) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_round_trip(out: Path, expected: dict[str, dict[str, int]], tmp_path: Path) -> None:
    """Every sample readable by tar, WebDataset and wids; labels, counts and manifests exact.

    ``expected``: split -> {source identity -> label}.
    """
    info = load_dataset_info(out)
    manifest = {row["key"]: row for row in read_manifest(out).to_pylist()}
    assert set(info.splits) == set(expected)
    assert len(manifest) == sum(len(v) for v in expected.values())
    for split, labels in expected.items():
        split_info = info.splits[split]
        assert split_info.num_samples == len(labels)
        assert dict(split_info.counts) == {
            name: Counter(labels.values()).get(i, 0) for i, name in enumerate(info.class_names)
        }
        paths = [Path(p) for p in info.shard_paths(split)]
        assert [p.name for p in paths] == [f"{split}-{i:06d}.tar" for i in range(len(paths))]

        # 1. plain tar: members grouped by key, sorted extensions, fixed metadata.
        seen: dict[str, int] = {}
        for path, shard in zip(paths, split_info.shards):
            listing = subprocess.run(
                ["tar", "-tvf", str(path)], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            names = [line.split()[-1] for line in listing]
            assert len(names) == 3 * shard.num_samples
            assert all(" 0/0 " in line and line.startswith("-rw-r--r--") and "1970-01-01" in line for line in listing)
            for i in range(0, len(names), 3):
                keys = {n.split(".")[0] for n in names[i : i + 3]}
                extensions = [n.split(".", 1)[1] for n in names[i : i + 3]]
                assert len(keys) == 1 and extensions == sorted(extensions) and {"cls", "json"} < set(extensions)
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    key, extension = member.name.split(".", 1)
                    data = tar.extractfile(member).read()
                    if extension == "cls":
                        seen[key] = int(data.decode("ascii"))
                    elif extension != "json":
                        assert hashlib.sha256(data).hexdigest() == manifest[key]["sha256"]
                        assert manifest[key]["shard"] == f"{split}/{path.name}"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256 and path.stat().st_size == shard.bytes
        by_source = {manifest[k]["source"]: label for k, label in seen.items()}
        assert by_source == labels

        # 2. WebDataset, decoding to PIL.
        dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False, nodesplitter=wds.single_node_only).decode(
            "pil"
        )
        read = {}
        for sample in dataset:
            image = next(v for k, v in sample.items() if k in ("jpg", "png", "webp"))
            assert image.mode == "RGB"
            meta = sample["json"]
            assert meta["label"] == sample["cls"] and meta["label_name"] == info.class_names[sample["cls"]]
            assert (meta["width"], meta["height"]) == (
                manifest[sample["__key__"]]["width"],
                manifest[sample["__key__"]]["height"],
            )
            read[meta["source"]] = sample["cls"]
        assert read == labels

        # 3. wids, random access through the split's index.
        indexed = wids.ShardListDataset(
            str(out / split / "wids.json"), cache_dir=str(tmp_path / f"wids-{split}"), transformations=[]
        )
        assert len(indexed) == len(labels)
        for index in range(0, len(indexed), max(1, len(indexed) // 7)):
            sample = indexed[index]
            meta = json.loads(sample[".json"].read())
            assert int(sample[".cls"].read()) == labels[meta["source"]]


def test_cifar10_parquet_round_trip(cifar_subset, tmp_path):
    out = tmp_path / "out"
    result = write_shards(cifar_subset, out, ShardConfig(), **FAST)
    scan = open_source(str(cifar_subset)).scan()
    expected = {split: {r.source: r.label for r in scan.records if r.split == split} for split in ("train", "test")}
    assert result.num_inputs == result.num_sharded == 320 and result.num_quarantined == 0
    check_round_trip(out, expected, tmp_path)
    # 32 px JPEGs are within bounds: stored as the original bytes, not re-encoded.
    rows = read_manifest(out).to_pylist()
    table = pq.read_table(cifar_subset / "train-00000-of-00001.parquet")
    row = next(r for r in rows if r["split"] == "train")
    original = table.column("image")[int(row["source"].split("#")[1])]["bytes"].as_py()
    assert hashlib.sha256(original).hexdigest() == row["sha256"] and (row["width"], row["height"]) == (32, 32)
    # No shard is one class: the order is shuffled before sharding.
    for shard in load_dataset_info(out).splits["train"].shards:
        assert len({r["label"] for r in rows if r["shard"] == shard.path}) >= 5


def test_flowers_image_folder_round_trip_with_resize_and_val_carve(flowers_subset, tmp_path):
    out = tmp_path / "out"
    config = ShardConfig(max_size=128, val_fraction=0.25, seed=3)
    result = write_shards(flowers_subset, out, config, **FAST)
    assert result.num_sharded == 33 and set(result.info.splits) == {"train", "val", "test"}
    # Stratified: 8 train images per class, a quarter of each into val.
    assert dict(result.info.splits["val"].counts) == {"00_daffodil": 2, "05_iris": 2, "16_pansy": 2}
    manifest = read_manifest(out).to_pylist()
    expected: dict[str, dict[str, int]] = {}
    for row in manifest:
        expected.setdefault(row["split"], {})[row["source"]] = row["label"]
        assert row["source"].split("/")[1] == result.info.class_names[row["label"]]  # label from the folder
        assert row["source"].startswith("test/" if row["split"] == "test" else "train/")
    check_round_trip(out, expected, tmp_path)
    for path in load_dataset_info(out).shard_paths("train"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    assert min(Image.open(tar.extractfile(member)).size) == 128


def test_bad_files_land_where_they_should(bad_corpus, tmp_path):
    out = tmp_path / "out"
    result = write_shards(bad_corpus.root, out, ShardConfig(max_pixels=bad_corpus.max_pixels), **FAST)
    quarantine = {row["source"]: row for row in read_quarantine(out).to_pylist()}
    manifest = {row["source"]: row for row in read_manifest(out).to_pylist()}
    assert {s: q["reason"] for s, q in quarantine.items()} == bad_corpus.expected_quarantine
    assert all(q["detail"] for q in quarantine.values())
    assert set(manifest) == bad_corpus.expected_sharded
    # Conservation, as reported and as written.
    assert result.num_inputs == len(bad_corpus.expected_sharded) + len(bad_corpus.expected_quarantine)
    assert result.num_inputs == result.num_sharded + result.num_quarantined == len(manifest) + len(quarantine)
    assert result.quarantined == dict(sorted(Counter(bad_corpus.expected_quarantine.values()).items()))

    samples = {}
    for path in load_dataset_info(out).shard_paths("train"):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                samples[member.name] = tar.extractfile(member).read()

    def image_of(source: str) -> tuple[str, Image.Image]:
        key = manifest[source]["key"]
        name = next(n for n in samples if n.startswith(key + ".") and not n.endswith((".cls", ".json")))
        return name.split(".", 1)[1], Image.open(io.BytesIO(samples[name]))

    rotated_ext, rotated = image_of("shapes/rotated.jpg")
    assert rotated.size == (40, 60) and (
        manifest["shapes/rotated.jpg"]["width"],
        manifest["shapes/rotated.jpg"]["height"],
    ) == (40, 60)
    assert np.asarray(rotated)[:20].mean(axis=(0, 1))[0] > 200  # red on top: the rotation was applied
    for source in ("flowers/cmyk.jpg", "shapes/sixteen.png", "shapes/palette.png"):
        extension, image = image_of(source)
        assert extension == "jpg" and image.mode == "RGB", source
    assert image_of("shapes/plain.png")[0] == "png"  # the original encoding kept, with its real extension
    assert abs(np.asarray(image_of("shapes/sixteen.png")[1]).mean() - 40000 / 257) < 3
    assert verify_shards(out).ok


def test_a_manifest_path_escaping_its_root_is_quarantined_not_read(tmp_path, flowers_subset):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    photo = next((flowers_subset / "train" / "05_iris").iterdir())
    (data / "img" / "a.jpg").write_bytes(photo.read_bytes())
    (tmp_path / "secret.jpg").write_bytes(photo.read_bytes())  # a real image: only the path check stops it
    (data / "list.csv").write_text("path,label\nimg/a.jpg,iris\n../secret.jpg,iris\nimg/missing.jpg,iris\n")
    result = write_shards(data / "list.csv", tmp_path / "out", ShardConfig(), **FAST)
    reasons = {row["source"]: row["reason"] for row in read_quarantine(tmp_path / "out").to_pylist()}
    assert reasons == {"../secret.jpg": "path_escapes_root", "img/missing.jpg": "unreadable_path"}
    assert result.num_inputs == 3 and result.num_sharded == 1


@pytest.mark.parametrize(
    "samples, per_sample, settings, expected",
    [
        (1088, 40_000, {}, 8),  # small corpus: one shard's worth, rounded up to the multiple
        (50_000, 4_000, {}, 8),
        (50_000, 4_000, {"max_shard_samples": 1000}, 56),  # 50 needed -> 56
        (50_000, 100_000, {"target_shard_bytes": 100 * 2**20}, 48),  # 4.8 GB / 100 MiB = 46 -> 48
        (5, 40_000, {}, 1),  # fewer samples than the multiple: no empty shards
        (13, 40_000, {"max_shard_samples": 2}, 8),  # needs 7; 8 fits in 13
        (10, 40_000, {"shard_multiple": 4}, 4),
        (0, 40_000, {}, 0),
    ],
)
def test_shard_count_rule(samples, per_sample, settings, expected):
    assert shard_count(samples, per_sample, ShardConfig(**settings)) == expected


def test_plan_spreads_samples_evenly_with_stable_unique_keys(cifar_subset):
    scan = open_source(str(cifar_subset)).scan()
    plan = plan_shards(scan, ShardConfig(max_shard_samples=20))
    sizes = [len(s.records) for s in plan.shards if s.split == "train"]
    assert len(sizes) == 16 and max(sizes) - min(sizes) <= 1 and sum(sizes) == 240
    keys = [k for s in plan.shards for k in s.keys]
    assert len(set(keys)) == len(keys) and all("." not in k and len(k) == 24 for k in keys)
    # Keys depend on split and identity only: listing order and seed do not change them.
    reversed_scan = dataclasses.replace(scan, records=scan.records[::-1])
    other = plan_shards(reversed_scan, ShardConfig(max_shard_samples=20, seed=7))
    assert {k for s in other.shards for k in s.keys} == set(keys)
    assert plan_shards(reversed_scan, ShardConfig(max_shard_samples=20)) == plan


def test_limit_takes_a_seeded_sample_per_split(cifar_subset):
    scan = open_source(str(cifar_subset)).scan()
    plan = plan_shards(scan, ShardConfig(limit=50))
    assert Counter(r.split for s in plan.shards for r in s.records) == {"train": 50, "test": 50}


def test_val_fraction_refuses_a_source_that_has_val(flowers_subset):
    scan = open_source(str(flowers_subset)).scan()
    records = [dataclasses.replace(r, split="val") if r.split == "test" else r for r in scan.records]
    val_scan = dataclasses.replace(scan, records=records)
    with pytest.raises(ValueError, match="already has a 'val' split"):
        plan_shards(val_scan, ShardConfig(val_fraction=0.1))


def test_two_runs_write_identical_bytes(flowers_subset, tmp_path):
    config = ShardConfig(max_size=96, max_shard_samples=5)
    write_shards(flowers_subset, tmp_path / "a", config, **FAST)
    write_shards(flowers_subset, tmp_path / "b", config, **FAST)
    a, b = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[name] == b[name] for name in a)
    assert sum(name.endswith(".tar") for name in a) == 8 + 8  # train needs 5 shards, test 2: both rounded up to 8


def test_rerun_rebuilds_only_missing_or_damaged_shards(cifar_subset, tmp_path):
    out = tmp_path / "out"
    config = ShardConfig(max_shard_samples=20)
    first = write_shards(cifar_subset, out, config, **FAST)
    original = all_files(out)
    shards = sorted(out.glob("*/*.tar"))
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    deleted, damaged = shards[2], shards[9]
    deleted.unlink()
    with open(damaged, "r+b") as f:  # same size, one byte flipped in the middle
        f.seek(damaged.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = verify_shards(out)
    assert not report.ok and {d.path for d in report.damaged} == {str(p.relative_to(out)) for p in (deleted, damaged)}

    second = write_shards(cifar_subset, out, config, **FAST)
    assert set(second.built) == {str(p.relative_to(out)) for p in (deleted, damaged)}
    assert len(second.reused) == len(first.built) - 2
    for path in shards:
        if path not in (deleted, damaged):
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == stats[path], f"{path} was rewritten"
    assert all_files(out) == original and verify_shards(out).ok


def test_changed_config_rebuilds_and_removes_stale_shards(cifar_subset, tmp_path):
    out = tmp_path / "out"
    write_shards(cifar_subset, out, ShardConfig(max_shard_samples=10), **FAST)
    assert len(list(out.glob("train/*.tar"))) == 24
    result = write_shards(cifar_subset, out, ShardConfig(max_shard_samples=40), **FAST)
    assert not result.reused and len(list(out.glob("train/*.tar"))) == 8
    assert len(list((out / ".vitflow").glob("*-*.json"))) == 8 + 8 and verify_shards(out).ok


def test_refuses_to_write_into_an_unrelated_folder(cifar_subset, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(ValueError, match="not empty and not a vitflow dataset"):
        write_shards(cifar_subset, tmp_path, ShardConfig(), **FAST)


def test_verify_reports_tampered_metadata(cifar_subset, tmp_path):
    out = tmp_path / "out"
    write_shards(cifar_subset, out, ShardConfig(), **FAST)
    doc = json.loads((out / "dataset.json").read_text())
    doc["class_names"][0] = "aeroplane"
    (out / "dataset.json").write_text(json.dumps(doc))
    report = verify_shards(out)
    assert not report.damaged and any("fingerprint" in p for p in report.problems)


def test_config_is_frozen_and_rejects_unknown_keys():
    with pytest.raises(ValueError, match="max_sise"):
        ShardConfig(max_sise=256)
    with pytest.raises(ValueError, match="val_fraction"):
        ShardConfig(val_fraction=1.5)
    with pytest.raises(ValueError):
        ShardConfig().max_size = 3
