"""Shard tasks on a real local Ray: any worker count writes the same bytes as the in-process run."""

from __future__ import annotations

import pytest

from pipeline import ShardConfig, read_quarantine, verify_shards, write_shards
from tests.pipeline.test_shards import all_files

pytestmark = pytest.mark.slow  # one Ray start (~5 s) plus worker start-up per module


def test_one_and_two_ray_workers_write_the_in_process_bytes(ray_session, cifar_subset, flowers_subset, tmp_path):
    for name, source, config in (
        ("cifar", cifar_subset, ShardConfig(max_shard_samples=30)),
        ("flowers", flowers_subset, ShardConfig(max_size=96, val_fraction=0.25)),
    ):
        reference = all_files(
            write_shards(source, tmp_path / name / "inline", config, workers=0, progress=False).info.root
        )
        for workers in (1, 2):
            result = write_shards(source, tmp_path / name / str(workers), config, workers=workers, progress=False)
            assert len(result.built) == len(result.info.splits["train"].shards) + sum(
                len(s.shards) for n, s in result.info.splits.items() if n != "train"
            )
            assert all_files(result.info.root) == reference, f"{name}: {workers} workers differ from in-process"


def test_bad_files_are_quarantined_inside_ray_tasks(ray_session, bad_corpus, tmp_path):
    result = write_shards(
        bad_corpus.root, tmp_path / "out", ShardConfig(max_pixels=bad_corpus.max_pixels), workers=2, progress=True
    )
    reasons = {row["source"]: row["reason"] for row in read_quarantine(tmp_path / "out").to_pylist()}
    assert reasons == bad_corpus.expected_quarantine
    assert result.num_inputs == result.num_sharded + result.num_quarantined
    assert verify_shards(tmp_path / "out").ok


def test_resume_on_ray_rebuilds_only_the_missing_shard(ray_session, cifar_subset, tmp_path):
    config = ShardConfig(max_shard_samples=30)
    first = write_shards(cifar_subset, tmp_path / "out", config, workers=2, progress=False)
    (tmp_path / "out" / first.built[3]).unlink()
    second = write_shards(cifar_subset, tmp_path / "out", config, workers=2, progress=False)
    assert second.built == (first.built[3],) and len(second.reused) == len(first.built) - 1
