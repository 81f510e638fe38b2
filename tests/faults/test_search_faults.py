"""Trials that go wrong, and a search under load, through the real `vitflow run` (its own Ray) on real
Flowers-17 shards: a learning rate that makes the loss non-finite stops its trial at once and the trial
is marked failed; a trial whose configuration is invalid fails with its reason; the search goes on and
registers its best trial. A 32-trial search at concurrency 2 ends with exactly 32 trial runs and no Ray
process left behind."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.faults.conftest import VITFLOW, vitflow, wait_for
from tests.workflows.servers import processes_mentioning
from vit import VisionTransformer, ViTConfig
from vit.inference import write_model_files

pytestmark = pytest.mark.slow

NORM = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


def processes_marked(marker: str) -> set[int]:
    """The processes whose environment holds ``marker``: a run's driver, and every Ray process it starts
    (raylet, GCS, workers: Ray hands its environment on), but no other test's."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.add(int(entry.name))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def pretrained_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pretrained"
    folder.mkdir()
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10))
    write_model_files(folder, model, [str(i) for i in range(10)], NORM)
    return folder


def search_spec(tmp_path: Path, flowers_source: Path, name: str, train: dict, search: dict) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": name, "workdir": "work", "tracking": {"experiment": name}, "ray": {"num_cpus": 2},
        "preprocess": {"flowers": {"source": str(flowers_source), "config": {"max_size": 48, "val_fraction": 0.25, "max_shard_samples": 24}}},
        "finetune": {"dataset": "flowers", "pretrained": str(pretrained_folder(tmp_path)),
                     "data": {"batch_size": 16, "num_workers": 0, **NORM}, "train": train, "search": search},
    }))
    return spec


def trial_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], "tags.`vitflow.stage` = 'finetune-trial'", max_results=1000)


def test_a_nan_trial_stops_at_once_a_broken_trial_fails_and_the_search_goes_on(tmp_path, flowers_source):
    total = 12
    spec = search_spec(tmp_path, flowers_source, "crashing",
                       train={"total_steps": total, "log_every": 1, "eval_every": 6, "checkpoint_every": 6},
                       search={"image_size": [32], "lr": {"min": 0.003, "max": 0.03}, "num_samples": 6,
                               "max_concurrent_trials": 2, "seed": 2, "max_failures": 1,
                               # 1e30: SGD overflows at once (a non-finite loss); label smoothing 1.5 is invalid
                               "choices": {"optim.lr": [0.01, 1.0e30], "train.label_smoothing": [0.0, 1.5]}})
    result = vitflow("run", str(spec), cwd=tmp_path, timeout_s=800)
    assert result.returncode == 0, result.stdout + result.stderr
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    runs = trial_runs(uri, "crashing")
    assert len(runs) == 6  # every trial is on record, failed ones included
    diverged = [r for r in runs if float(r.data.params["optim.lr"]) == 1.0e30 and float(r.data.params["train.label_smoothing"]) == 0]
    broken = [r for r in runs if float(r.data.params["train.label_smoothing"]) == 1.5]
    healthy = [r for r in runs if r not in diverged and r not in broken]
    assert diverged and broken and healthy, "seed 2 draws every kind of trial (3 healthy, 1 diverging, 2 invalid)"
    for run in diverged:
        assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags["vitflow.error"]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert max(steps, default=0) < total  # stopped early, not run to the end of its budget
    for run in broken:
        assert run.info.status == "FAILED" and "label_smoothing must be in [0, 1)" in run.data.tags["vitflow.error"]
    assert all(r.info.status == "FINISHED" for r in healthy)
    versions = client.search_model_versions("name = 'vit-finetuned'")
    assert len(versions) == 1  # the search went on and registered its best (healthy) trial
    best = client.get_run(versions[0].run_id)
    assert best.info.run_id in {r.info.run_id for r in healthy}
    print(f"\nRELIABILITY crashing trials: {len(diverged)} diverging (lr 1e30) stopped at step "
          f"{max(max((m.step for m in client.get_metric_history(r.info.run_id, 'train/loss')), default=0) for r in diverged)} "
          f"of {total}; {len(broken)} invalid (label smoothing 1.5) failed with the reason; {len(healthy)} finished; "
          f"best registered as vit-finetuned/1")


def test_32_trials_at_concurrency_2_leave_32_runs_and_no_processes(tmp_path, flowers_source):
    marker = uuid.uuid4().hex  # in the run's environment, and so in each of its Ray processes'
    spec = search_spec(tmp_path, flowers_source, "load",
                       train={"total_steps": 4, "log_every": 2, "eval_every": 2, "checkpoint_every": 4},
                       search={"image_size": [32, 48], "lr": {"min": 0.003, "max": 0.03}, "num_samples": 32,
                               "max_concurrent_trials": 2})
    started = time.monotonic()
    # ~1 min on 2 cores (trials reuse their processes); pytest's own limit is 900 s
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([VITFLOW, "run", str(spec)], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "VITFLOW_TEST_RUN": marker})
    # the accounting sees the run's Ray: its raylet carries the marker (else "none left" would prove nothing)
    wait_for(lambda: processes_marked(marker) & set(processes_mentioning("raylet")), 120, "the run's raylet")
    driver.wait(timeout=800)
    elapsed = time.monotonic() - started
    assert driver.returncode == 0, log.read_text()[-4000:]
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    runs = trial_runs(uri, "load")
    assert len(runs) == 32 and len({r.data.tags["vitflow.trial_id"] for r in runs}) == 32
    assert all(r.info.status == "FINISHED" for r in runs)
    wait_for(lambda: not processes_marked(marker), 60, "the search's Ray processes to exit")
    print(f"\nRELIABILITY load: 32 trials at concurrency 2 in {elapsed / 60:.1f} min; 32 trial runs; "
          f"no process of the run left")
