"""Fixtures every suite shares, created once per session: the real sample corpora next to the repository,
small slices of them, their shards, and one finished mini workflow."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        raise FileNotFoundError(
            f"the sample corpora are missing: expected {DATASETS} (../shared/datasets next to the repository)"
        )
    return DATASETS


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


# Secrets a user's shell may hold while running vitflow; none may reach MLflow or the run storage.
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN")


@dataclass(frozen=True)
class FinishedWorkflow:
    spec: Path
    workdir: Path
    planted: dict[str, str]  # secret variable -> the canary value it held
    username: str  # MLFLOW_TRACKING_USERNAME: recorded, as MLflow means it to be, as the runs' user
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mini_workflow(tmp_path_factory, cifar_source, flowers_source) -> FinishedWorkflow:
    """The mini workflow (shard two corpora, pre-train on Ray Train, a two-trial search, evaluate) run once
    by `vitflow run`, with canary secrets in its environment. Tests that only read a finished workflow
    share it (the console test reads what it printed, the MLflow UI test renders it, the security test
    scans it for the canaries): it is the suite's most expensive setup. Read it, never write to it."""
    import yaml

    from tests.workflows.test_runner import mini_spec

    root = tmp_path_factory.mktemp("mini-workflow")
    spec = mini_spec(cifar_source, flowers_source)
    spec["workdir"] = str(root / "work")
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    planted = {name: f"canary-{name.lower().replace('_', '-')}-{secrets.token_hex(12)}" for name in SECRET_VARIABLES}
    username = f"canary-user-{secrets.token_hex(8)}"
    start = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).parent / "vitflow"), "run", str(path)], capture_output=True,
                            text=True, timeout=1200, env={**os.environ, **planted, "MLFLOW_TRACKING_USERNAME": username})
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return FinishedWorkflow(spec=path, workdir=root / "work", planted=planted, username=username,
                            stdout=result.stdout, stderr=result.stderr, elapsed_s=time.monotonic() - start)
