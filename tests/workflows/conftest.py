"""Fixtures for the workflow tests: real CIFAR-10 shards, a real local Ray, a real MLflow store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import DATASETS


@pytest.fixture(scope="session")
def cifar_source(tmp_path_factory) -> Path:
    """800 real CIFAR-10 rows (640 train, 160 test) in the Hugging Face Parquet layout."""
    root = tmp_path_factory.mktemp("cifar-src") / "cifar10"
    root.mkdir()
    for split, rows in (("train", 640), ("test", 160)):
        name = f"{split}-00000-of-00001.parquet"
        pq.write_table(pq.read_table(DATASETS / "cifar10" / name).slice(0, rows), root / name)
    return root


@pytest.fixture(scope="session")
def flowers_source(tmp_path_factory) -> Path:
    """6 real Flowers-17 classes, 16 train and 4 test photos each, in the image-folder layout."""
    root = tmp_path_factory.mktemp("flowers-src") / "flowers17"
    classes = sorted(p.name for p in (DATASETS / "flowers17" / "train").iterdir())[:6]
    for split, count in (("train", 16), ("test", 4)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for file in sorted((DATASETS / "flowers17" / split / name).iterdir())[:count]:
                shutil.copyfile(file, root / split / name / file.name)
    return root


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory, cifar_source) -> Path:
    """The CIFAR-10 sample sharded by vitflow's own pipeline, 20% of train carved out as validation:
    several shards per split, so ranks and loader workers split them."""
    from pipeline import ShardConfig, write_shards

    out = tmp_path_factory.mktemp("cifar-shards") / "cifar10"
    write_shards(cifar_source, out, ShardConfig(val_fraction=0.2, max_shard_samples=100), workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def flowers_shards(tmp_path_factory, flowers_source) -> Path:
    """The Flowers-17 sample resized to 64 px by vitflow's pipeline, a quarter of train as validation."""
    from pipeline import ShardConfig, write_shards

    out = tmp_path_factory.mktemp("flowers-shards") / "flowers17"
    write_shards(flowers_source, out, ShardConfig(max_size=64, val_fraction=0.25, max_shard_samples=24), workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A real local Ray with 2 CPUs and its state under the test's temp dir; shut down afterwards."""
    import ray

    temp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_TMPDIR"] = str(temp)
    # A loaded machine (CI, or a benchmark beside the tests) can take over Ray Train's default 60 s to
    # start a worker group (each worker imports torch); the controller reads this at start.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    from workflows.finetune import TRIAL_DRIVER_RESOURCE

    ray.init(num_cpus=2, resources={TRIAL_DRIVER_RESOURCE: 2}, include_dashboard=True, _temp_dir=str(temp),
             logging_level="WARNING")
    yield ray
    ray.shutdown()
