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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which turns the mark into the test's group
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (the README's test command: ``-n 2 --dist loadgroup``) the tests that read the
    finished mini workflow run on one worker, so the suite's most expensive fixture (about 2 minutes) is made
    once, not once per worker. Every other test is handed out on its own. (xdist 3.8 writes the group into
    ``item._nodeid``, which pytest 9.2 no longer reads a test's id from: pytest-dev/pytest-xdist#1386, open;
    pyproject.toml keeps pytest below 9.2.)"""
    for item in items:
        if "mini_workflow" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("mini-workflow"))


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


@pytest.fixture(scope="session")
def object_store():
    """A real S3-compatible server (SeaweedFS) for the session, with access-key auth."""
    import tempfile

    from tests.objectstore import SeaweedFS

    store = SeaweedFS(Path(tempfile.mkdtemp(prefix="vitflow-s3-", dir="/tmp")))  # short paths (sockets)
    store.start()
    yield store
    store.stop()
    shutil.rmtree(store.root, ignore_errors=True)


@pytest.fixture
def bucket(object_store, monkeypatch, request) -> str:
    """A new bucket (``s3://NAME``) on the test store, and the standard AWS environment pointing at it."""
    import uuid

    for name, value in object_store.env.items():
        monkeypatch.setenv(name, value)
    return object_store.create_bucket(f"t-{uuid.uuid4().hex[:12]}")


@dataclass(frozen=True)
class TrackingServer:
    url: str  # http://127.0.0.1:PORT
    artifacts: str  # s3://BUCKET/mlartifacts: where the server keeps (proxies) every artifact
    database: str  # the PostgreSQL URL of its backend store (credentials included: for the tests only)


@pytest.fixture(scope="session")
def team_tracking_server(object_store, tmp_path_factory):
    """An MLflow tracking server as a team runs one: runs and registry in PostgreSQL, artifacts in the
    object store (proxied: clients need no S3 settings)."""
    import tempfile

    from tests.objectstore import Postgres, free_port
    from tests.workflows.servers import MlflowServer

    database = Postgres(Path(tempfile.mkdtemp(prefix="vitflow-pg-", dir="/tmp")))
    database.start()
    bucket = object_store.create_bucket("tracking")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", database.url,
               "--artifacts-destination", f"{bucket}/mlartifacts", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {**os.environ, **object_store.env, "MLFLOW_S3_ENDPOINT_URL": object_store.endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = tmp_path_factory.mktemp("tracking-server") / "mlflow-server.log"
    try:
        with MlflowServer(command, port, log, env=env) as server:
            yield TrackingServer(url=server.url, artifacts=f"{bucket}/mlartifacts", database=database.url)
    finally:
        database.stop()
        shutil.rmtree(database.root, ignore_errors=True)


# Secrets a user's shell may hold while running vitflow; none may reach MLflow or the run storage.
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "RAY_AUTH_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN")


@dataclass(frozen=True)
class FinishedWorkflow:
    spec: Path
    workdir: Path
    bucket: str  # s3://NAME: the workflow's shards and run storage (storage_path) are there
    planted: dict[str, str]  # secret variable -> the canary value it held (the store's real keys for AWS_*)
    username: str  # MLFLOW_TRACKING_USERNAME: recorded, as MLflow means it to be, as the runs' user
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.workdir / 'mlflow.db'}"


@pytest.fixture(scope="session")
def mini_workflow(tmp_path_factory, cifar_source, flowers_source, object_store) -> FinishedWorkflow:
    """The mini workflow (shard two corpora, pre-train on Ray Train, a two-trial search, evaluate) run once
    by `vitflow run`, its shards and run storage in the test object store (every location an s3:// URI),
    with canary secrets in its environment (the store's own access keys among them). Tests that only read
    a finished workflow share it (the console test reads what it printed, the MLflow UI test renders it,
    the security test scans it for the secrets, the storage test looks where its files went): it is the
    suite's most expensive setup. Read it, never write to it."""
    import yaml

    from tests.workflows.test_runner import mini_spec

    root = tmp_path_factory.mktemp("mini-workflow")
    bucket = object_store.create_bucket("mini-workflow")
    spec = mini_spec(cifar_source, flowers_source)
    spec["workdir"] = str(root / "work")
    spec["storage_path"] = f"{bucket}/runs"
    for name, stage in spec["preprocess"].items():
        stage["out"] = f"{bucket}/shards/{name}"
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    planted = {name: f"canary-{name.lower().replace('_', '-')}-{secrets.token_hex(12)}" for name in SECRET_VARIABLES}
    # The store's real keys stand in for the AWS canaries (a session token would be sent to the store too).
    planted.update({name: object_store.env[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    del planted["AWS_SESSION_TOKEN"]
    username = f"canary-user-{secrets.token_hex(8)}"
    start = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).parent / "vitflow"), "run", str(path)], capture_output=True,
                            text=True, timeout=1200, cwd=root,
                            env={**os.environ, **object_store.env, **planted, "MLFLOW_TRACKING_USERNAME": username})
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return FinishedWorkflow(spec=path, workdir=root / "work", bucket=bucket, planted=planted, username=username,
                            stdout=result.stdout, stderr=result.stderr, elapsed_s=time.monotonic() - start)
