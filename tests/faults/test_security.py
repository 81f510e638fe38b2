"""Nothing from a shard, a checkpoint or a downloaded model is unpickled; secrets in the environment never
reach MLflow.

The planted payload is a real malicious pickle: its ``__reduce__`` makes unpickling call
``open(marker, "w")``, which creates the marker file. Each test first proves the payload works (a plain
unpickle creates a control marker), then feeds it to vitflow and proves the marker never appears.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import manifest
from tests.cli import run_vitflow
from tests.conftest import SECRET_VARIABLES
from vit import VisionTransformer, ViTConfig

pytestmark = pytest.mark.slow

VITFLOW = str(Path(sys.executable).parent / "vitflow")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves code from the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weights": Payload(marker)})


def assert_payload_is_live(tmp_path: Path, write, load) -> None:
    """The control: a payload made the same way, loaded the unsafe way, does run (so a missing marker
    means vitflow refused the planted one, not that the payload was harmless)."""
    control, file = tmp_path / "control-marker", tmp_path / "control-payload"
    write(file, control)
    load(file)
    assert control.exists(), "the payload is not live: the test would prove nothing"


def pickled(file: Path, marker: Path) -> None:
    file.write_bytes(malicious_pickle(marker))


def unpickled(file: Path) -> object:
    return pickle.loads(file.read_bytes())


def torch_unsafe_load(file: Path) -> object:
    return torch.load(file, weights_only=False)


def vitflow(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([VITFLOW, *args], capture_output=True, text=True, timeout=timeout, env=env)


# --- (a) shards: members that a decoder would unpickle -------------------------------------------------

def poison_dataset(clean: Path, out: Path, marker: Path) -> list[str]:
    """A copy of ``clean`` whose train shards carry ``.pyd``, ``.pickle`` and ``.pth`` members (malicious
    pickles) beside every sample, with dataset.json's sizes, checksums and fingerprint recomputed: a
    dataset someone else made, consistent in every way the records can tell. Returns the shard paths."""
    shutil.copytree(clean, out)
    info = manifest.load_dataset_info(out)
    payload = malicious_pickle(marker)
    poisoned_splits = dict(info.splits)
    changed = []
    split = info.splits["train"]
    shards = []
    for shard in split.shards:
        path = out / shard.path
        rebuilt = path.with_suffix(".new")
        with tarfile.open(path) as source, tarfile.open(rebuilt, "w", format=tarfile.USTAR_FORMAT) as target:

            def plant(key: str) -> None:  # beside the sample's own members, as WebDataset groups them
                for extension in ("pyd", "pickle", "pth"):
                    entry = tarfile.TarInfo(f"{key}.{extension}")
                    entry.size = len(payload)
                    target.addfile(entry, io.BytesIO(payload))

            previous = None
            for member in source.getmembers():
                key = member.name.split(".", 1)[0]
                if previous is not None and key != previous:
                    plant(previous)
                target.addfile(member, source.extractfile(member))
                previous = key
            plant(previous)
        os.replace(rebuilt, path)
        shards.append(dataclasses.replace(shard, bytes=path.stat().st_size, sha256=manifest.file_sha256(path)))
        changed.append(shard.path)
    poisoned_splits["train"] = dataclasses.replace(split, shards=tuple(shards))
    manifest.write_dataset_info(dataclasses.replace(
        info, splits=poisoned_splits, fingerprint=manifest.fingerprint(poisoned_splits, info.class_names, info.config)))
    return changed


def test_shard_members_are_never_unpickled(tmp_path, cifar_shards):
    from pipeline import verify_shards
    from vit.data import DataConfig, eval_loader, train_loader

    marker = tmp_path / "MARKER"
    root = tmp_path / "poisoned"
    changed = poison_dataset(cifar_shards, root, marker)
    assert_payload_is_live(tmp_path, pickled, unpickled)

    # The loader reads every sample of the split (images and labels only) and skips the rest unread.
    config = DataConfig(batch_size=32, num_workers=0, image_size=32, shuffle_buffer=0)
    expected = manifest.load_dataset_info(root).splits["train"].num_samples
    train = train_loader(root, config, rank=0, world_size=1, split="train")
    seen = sum(len(batch[1]) for batch in train.epoch(0))
    assert seen >= expected  # ceil: the last batch wraps around to the start
    evaluated = sum(len(batch[1]) for batch in eval_loader(root, config, rank=0, world_size=1, split="train"))
    assert evaluated == expected
    assert not marker.exists()

    # verify reads every member's bytes, decodes none, and names the shards that hold foreign members.
    report = verify_shards(root)
    assert not report.ok and {d.path for d in report.damaged} == set(changed) and not report.problems
    assert all("members outside the format: .pickle, .pth, .pyd" in d.problem for d in report.damaged)
    result = run_vitflow("shard", "verify", str(root))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    for path in changed:
        assert f"damaged: {path}: sample " in result.stderr and ".pyd" in result.stderr
    assert not marker.exists()


# --- (b) a training checkpoint resumed by vit.loop -------------------------------------------------------

TINY = ViTConfig(image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3)


def test_a_malicious_checkpoint_is_refused_on_resume(tmp_path):
    from vit.checkpoint import (
        CHECKPOINT_FILE,
        CHECKPOINT_FORMAT,
        CHECKPOINT_VERSION,
        load_checkpoint,
    )
    from vit.loop import TrainConfig, fit

    marker = tmp_path / "MARKER"
    folder = tmp_path / "checkpoints" / "step-000004"
    folder.mkdir(parents=True)
    model = VisionTransformer(TINY)
    # A checkpoint in every other way: the format tags, real weights, and one poisoned entry.
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model.state_dict(),
                "step": 4, "rng": Payload(marker)}, folder / CHECKPOINT_FILE)
    assert_payload_is_live(tmp_path, lambda file, control: torch.save({"rng": Payload(control)}, file), torch_unsafe_load)

    class Batches:
        batches_per_epoch = 2

        def epoch(self, epoch, start_batch=0):
            for _ in range(start_batch, self.batches_per_epoch):
                yield torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))

    with pytest.raises(ValueError) as error:
        fit(model, Batches(), None, TrainConfig(total_steps=8), report=lambda *a, **k: None,
            checkpoint_dir=tmp_path / "checkpoints", resume_from=folder)
    message = str(error.value)
    assert str(folder / CHECKPOINT_FILE) in message and "refused to load" in message and "io.open" in message
    assert "weights_only=False" not in message  # never advise the unsafe way
    with pytest.raises(ValueError, match="refused to load"):
        load_checkpoint(folder)
    assert not marker.exists()


# --- (c) a downloaded model: weights.pt of a model in a real MLflow store ------------------------------

@pytest.fixture
def poisoned_registry(tmp_path):
    """A real MLflow store with a registered model `evil-vit` v1 whose weights.pt is a malicious pickle;
    its config and class names are valid, so only the weights can stop it."""
    from mlflow.tracking import MlflowClient

    from workflows.tracking import CLASSES_FILE, CONFIG_FILE, WEIGHTS_FILE

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    marker = tmp_path / "MARKER"
    files = tmp_path / "model"
    files.mkdir()
    torch.save({**VisionTransformer(TINY).state_dict(), "head.weight": Payload(marker)}, files / WEIGHTS_FILE)
    (files / CONFIG_FILE).write_text(json.dumps(TINY.to_dict()))
    (files / CLASSES_FILE).write_text(json.dumps(["a", "b", "c"]))
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("downloads", artifact_location=(store / "artifacts").as_uri())
    run = client.create_run(experiment)
    for name in (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE):
        client.log_artifact(run.info.run_id, str(files / name), artifact_path="model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("evil-vit")
    client.create_model_version("evil-vit", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    shutil.rmtree(files)  # only the store's copy remains
    return uri, run.info.run_id, marker


def test_downloaded_weights_are_never_unpickled(tmp_path, poisoned_registry, flowers_shards):
    from workflows.tracking import load_plain_model

    uri, run_id, marker = poisoned_registry
    assert_payload_is_live(tmp_path, lambda file, control: torch.save({"head.weight": Payload(control)}, file),
                           torch_unsafe_load)

    for model_uri in ("models:/evil-vit/1", f"runs:/{run_id}/model"):
        with pytest.raises(ValueError) as error:
            load_plain_model(uri, model_uri)
        assert f"model {model_uri!r}" in str(error.value) and "refused to load" in str(error.value), error.value
        assert not marker.exists()

    # The fine-tuning entry resolves models:/evil-vit/1 and refuses it before Ray starts anything.
    config = {
        "name": "from-evil", "pretrained": "models:/evil-vit/1", "dataset": str(flowers_shards),
        "storage_path": str(tmp_path / "runs"), "tracking": {"uri": uri, "experiment": "finetune"},
        "data": {"batch_size": 8, "num_workers": 0},
        "train": {"total_steps": 2, "log_every": 1, "eval_every": 2, "checkpoint_every": 2},
        "search": {"image_size": [8], "lr": {"min": 0.001, "max": 0.01}, "num_samples": 1},
    }
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.monotonic()
    result = vitflow("finetune", str(path))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "models:/evil-vit/1" in result.stderr and "refused to load" in result.stderr, result.stderr[-3000:]
    # ... and so does evaluation.
    result = vitflow("evaluate", "models:/evil-vit/1", str(flowers_shards), "--tracking-uri", uri)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "refused to load" in result.stderr
    assert not marker.exists()
    print(f"poisoned weights refused by `vitflow finetune` and `vitflow evaluate` in {time.monotonic() - start:.0f} s")


# --- secrets in the environment never reach MLflow -----------------------------------------------------

# MLFLOW_TRACKING_USERNAME is not among them: it is who logs, and MLflow records it as `mlflow.user`.


def canaries() -> dict[str, str]:
    return {name: f"canary-{name.lower().replace('_', '-')}-{secrets.token_hex(12)}" for name in SECRET_VARIABLES}


def leaks(tracking_uri: str, values: list[str]) -> list[str]:
    """Every place in an MLflow store where one of ``values`` appears: params, tags, metric names of every
    run (deleted ones too), logged models, registered models and versions, every artifact file's bytes,
    and the bytes of the sqlite database itself."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    found = []

    def check(where: str, text: object) -> None:
        if isinstance(text, dict):  # name the key it is under
            for key, item in text.items():
                check(f"{where} {key}", (key, item))
            return
        found.extend(f"{where}: {value[:20]}..." for value in values if value in str(text))

    experiments = client.search_experiments(view_type=ViewType.ALL)
    for experiment in experiments:
        check(f"experiment {experiment.name}", (experiment.name, experiment.tags, experiment.artifact_location))
        for run in client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=50_000):
            check(f"run {run.info.run_id} params", run.data.params)
            check(f"run {run.info.run_id} tags", run.data.tags)
            check(f"run {run.info.run_id} metrics", list(run.data.metrics))
            check(f"run {run.info.run_id} info", run.info)
        for model in client.search_logged_models([experiment.experiment_id]):
            check(f"logged model {model.model_id} params", model.params)
            check(f"logged model {model.model_id} tags", model.tags)
            check(f"logged model {model.model_id} name", model.name)
    for registered in client.search_registered_models():
        check(f"registered model {registered.name} tags", registered.tags)
        check(f"registered model {registered.name}", (registered.description, registered.aliases))
        for version in client.search_model_versions(f"name = '{registered.name}'"):
            check(f"model version {registered.name}/{version.version} tags", version.tags)
            check(f"model version {registered.name}/{version.version}", (version.description, version.source))
    artifact_roots = {Path(e.artifact_location.removeprefix("file://")) for e in experiments
                      if e.artifact_location.startswith(("file://", "/"))}
    files = [file for root in artifact_roots if root.is_dir() for file in root.rglob("*") if file.is_file()]
    assert files, "no artifact files found to search: the scan would prove nothing"
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    sqlite3.connect(database).execute("PRAGMA wal_checkpoint(FULL)").close()  # everything into the main file
    files += [p for p in database.parent.glob(database.name + "*") if p.is_file()]  # db, -wal, -shm, -journal
    for file in files:
        data = file.read_bytes()
        found.extend(f"{file}: {value[:20]}..." for value in values if value.encode() in data)
    return found


def test_the_leak_scan_finds_a_planted_secret(tmp_path):
    """The scan itself can fail: a secret logged on purpose is found in params, artifacts and the database."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("control", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    planted = canaries()["AWS_SECRET_ACCESS_KEY"]
    client.log_param(run.info.run_id, "oops", planted)
    client.log_text(run.info.run_id, f"key: {planted}\n", "config.yaml")
    found = leaks(uri, [planted])
    assert any("params" in where for where in found) and any("config.yaml" in where for where in found)
    assert any("mlflow.db" in where for where in found)


def test_secrets_in_the_environment_never_reach_mlflow(mini_workflow, object_store):
    """A whole tiny workflow (shard, pre-train on Ray Train, a two-trial search, evaluation) run by
    `vitflow run` with secrets in its environment, the object store's access keys among them: none of
    them is anywhere in the tracking store, the bucket, the working folder (its Ray log included)."""
    from mlflow.tracking import MlflowClient

    uri = mini_workflow.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) >= 6 and client.search_model_versions("name = 'vit-finetuned'")  # the scan covers real work
    found = leaks(uri, list(mini_workflow.planted.values()))
    assert found == [], "\n".join(found)
    # The login name is recorded, as MLflow means it to be: only as the `mlflow.user` of what it logged.
    named = [where for where in leaks(uri, [mini_workflow.username])
             if not where.startswith(str(mini_workflow.workdir / "mlflow.db"))]
    assert named and all(" mlflow.user: " in where for where in named), named
    # Outside MLflow: the bucket (shards, checkpoints, Ray's run state) and the working folder hold none either.
    stored = object_store.objects(mini_workflow.bucket)
    assert any(name.startswith("runs/") for name in stored)  # the scan covers the run storage
    outside = [name for name, data in stored.items() for value in mini_workflow.planted.values() if value.encode() in data]
    outside += [str(file) for file in mini_workflow.workdir.rglob("*") if file.is_file() and "mlflow.db" not in file.name
                for value in mini_workflow.planted.values() if value.encode() in file.read_bytes()]
    assert outside == [], outside
    print(f"secrets scan: {len(runs)} runs, `vitflow run` {mini_workflow.elapsed_s:.0f} s, no secret in the store "
          f"or the run storage")
