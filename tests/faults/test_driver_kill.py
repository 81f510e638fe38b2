"""The workflow driver (`vitflow run`) SIGKILLed mid-stage, then the same workflow run again: it finishes,
reuses the finished stages, resumes pre-training from its checkpoint and two concurrent searches each from
its own Tune state, registers exactly one model version per name, and leaves no Ray process behind. Real
processes, real kills."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.faults.conftest import VITFLOW, checkpoint_steps, vitflow, wait_for
from vit import VisionTransformer, ViTConfig
from vit.inference import write_model_files
from workflows.compute.local_ray import processes_under, temp_root

pytestmark = pytest.mark.slow

NORM = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


def start_driver(spec: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        # Its own session: the kill below reaches the driver alone, as a crash or an OOM kill would.
        return subprocess.Popen([VITFLOW, "run", str(spec)], cwd=spec.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def sigkill(driver: subprocess.Popen) -> float:
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    return time.time()


def runs_of(uri: str, experiment: str, query: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], query) if found else []


def test_a_killed_workflow_resumes_pretraining_and_registers_one_version(tmp_path, cifar_source):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "killed", "workdir": "work", "tracking": {"experiment": "killed"}, "ray": {"num_cpus": 2},
        "preprocess": {"cifar": {"source": str(cifar_source), "config": {"val_fraction": 0.2, "max_shard_samples": 100}}},
        "pretrain": {"dataset": "cifar", "model": {"variant": "Ti/4", "image_size": 32, "embed_dim": 96, "depth": 4, "num_heads": 3},
                     "data": {"batch_size": 32, "num_workers": 1, **NORM},
                     "resources": {"num_workers": 1, "cpus_per_worker": 2},
                     "train": {"total_steps": 120, "log_every": 5, "checkpoint_every": 40, "eval_every": 40}},
    }))
    workdir = tmp_path / "work"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    log = tmp_path / "driver.log"
    driver = start_driver(spec, log)
    try:
        # A complete one (its folder appears before its file is copied in): the rerun must find it.
        wait_for(lambda: checkpoint_steps(workdir / "runs", "killed-pretrain-*/checkpoint_*"), 900,
                 "pre-training's first checkpoint", every_s=0.5)
        time.sleep(2)
    finally:
        killed_at = sigkill(driver)
    left_by_the_kill = processes_under(temp_root(workdir))

    rerun = vitflow("run", str(spec), cwd=tmp_path, timeout_s=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "preprocess:cifar: reused" in rerun.stdout, rerun.stdout  # the finished stage is not redone
    assert processes_under(temp_root(workdir)) == []  # the rerun's Ray, and the killed driver's, are gone

    client = MlflowClient(uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'vit-pretrained'")) == 1  # exactly one version
    pretrain_runs = runs_of(uri, "killed", "tags.`vitflow.stage` = 'pretrain'")
    assert len(pretrain_runs) == 1 and pretrain_runs[0].info.status == "FINISHED"  # the same run, resumed
    losses = sorted(client.get_metric_history(pretrain_runs[0].info.run_id, "train/loss"), key=lambda m: m.timestamp)
    assert {m.step for m in losses} == set(range(5, 121, 5))
    before = [m.step for m in losses if m.timestamp / 1000 <= killed_at]
    after = [m for m in losses if m.timestamp / 1000 > killed_at]
    resumed_from = min(m.step for m in after) - 5
    assert resumed_from >= 40 and resumed_from % 40 == 0  # from a checkpoint, not from step 0

    executions = runs_of(uri, "killed", "tags.`vitflow.workflow` = 'killed'")
    statuses = sorted(run.info.status for run in executions)
    assert statuses == ["FINISHED", "KILLED"]  # the dead execution is closed, not left RUNNING
    finished = next(run for run in executions if run.info.status == "FINISHED")
    killed = next(run for run in executions if run.info.status == "KILLED")
    assert finished.data.tags["vitflow.continues"] == killed.info.run_id
    recovery_s = min(m.timestamp for m in after) / 1000 - killed_at
    print(f"\nRELIABILITY driver SIGKILL (pre-training): {len(left_by_the_kill)} Ray processes outlived the driver "
          f"(stopped by the rerun); killed at step ~{max(before, default=0)}; the rerun reused preprocess:cifar, resumed "
          f"from the step-{resumed_from} checkpoint ({max(before, default=0) - resumed_from} steps redone), first new "
          f"metric {recovery_s:.0f} s after the kill (the rerun started at once); one vit-pretrained version")


def test_killed_concurrent_searches_resume_each_with_its_finished_trials(tmp_path, flowers_source):
    """Two downstream tasks, their searches running at the same time (each in a Ray task of its own,
    ``workflows.compute.searches``): the driver is killed once a trial has finished; the rerun resumes each
    search from its own Tune state into its own MLflow run. (One task's search runs the same stage code in the
    driver itself; the kill's mechanics for a single stage are the pre-training test's above.)"""
    pretrained = tmp_path / "pretrained"
    pretrained.mkdir()
    model = VisionTransformer(ViTConfig(image_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10))
    write_model_files(pretrained, model, [str(i) for i in range(10)], {"mean": NORM["mean"], "std": NORM["std"]})
    num_samples = 4  # per search; trials finish in seconds: enough that the searches are still going at the kill
    tasks = ["flowers", "garden"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "search", "workdir": "work", "tracking": {"experiment": "search"}, "ray": {"num_cpus": 2},
        "preprocess": {"flowers": {"source": str(flowers_source), "config": {"max_size": 64, "val_fraction": 0.25, "max_shard_samples": 24}}},
        "finetune": {"pretrained": str(pretrained),
                     "data": {"batch_size": 16, "num_workers": 0, **NORM},
                     "train": {"total_steps": 12, "log_every": 3, "eval_every": 6, "checkpoint_every": 6},
                     "search": {"image_size": [32, 48], "lr": {"min": 0.003, "max": 0.03}, "num_samples": num_samples,
                                "max_concurrent_trials": 1},
                     "tasks": {task: {"dataset": "flowers"} for task in tasks}},
    }))
    workdir = tmp_path / "work"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    driver = start_driver(spec, tmp_path / "driver.log")

    def finished_trials():
        return [r for r in runs_of(uri, "search", "tags.`vitflow.stage` = 'finetune-trial'") if r.info.status == "FINISHED"]

    try:
        # A trial's run is FINISHED as it reports its last result (not when the search ends): kill at the first,
        # once both searches have saved their state.
        wait_for(finished_trials, 900, "a finished trial", every_s=0.25)
        wait_for(lambda: all(list((workdir / "runs").glob(f"search-finetune-{task}-*/experiment_state-*.json"))
                             for task in tasks), 120, "both searches' saved state", every_s=0.5)
    finally:
        killed_at = sigkill(driver)
    done_before = {r.data.tags["vitflow.trial_id"] for r in finished_trials()}
    assert len(done_before) < 2 * num_samples, "the searches ended before the kill: nothing left to resume"

    rerun = vitflow("run", str(spec), cwd=tmp_path, timeout_s=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "preprocess:flowers: reused" in rerun.stdout, rerun.stdout
    client = MlflowClient(uri, registry_uri=uri)
    searches = runs_of(uri, "search", "tags.`vitflow.stage` = 'finetune'")
    assert len(searches) == 2 and all(s.info.status == "FINISHED" for s in searches)  # the same two runs, resumed
    trials = runs_of(uri, "search", "tags.`vitflow.stage` = 'finetune-trial'")
    for search in searches:  # one child run per trial of each search: none duplicated, none lost, none swapped
        own = [r for r in trials if r.data.tags["mlflow.parentRunId"] == search.info.run_id]
        assert len(own) == num_samples, (search.info.run_name, len(own))
    assert len(trials) == 2 * num_samples and all(r.info.status == "FINISHED" for r in trials)
    for run in trials:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        if run.data.tags["vitflow.trial_id"] in done_before:  # finished before the kill: not trained again
            assert steps == [3, 6, 9, 12]
            assert all(m.timestamp / 1000 <= killed_at for m in client.get_metric_history(run.info.run_id, "train/loss"))
        else:  # a trial cut short resumes from its checkpoint: steps after it may be logged twice, none missing
            assert set(steps) == {3, 6, 9, 12}, steps
    for trial_id in {r.data.tags["vitflow.trial_id"] for r in trials} - done_before:  # resumed: shown on the console
        assert f"trial {trial_id} " in rerun.stdout, rerun.stdout[-3000:]
    for task in tasks:  # each task's one model version, under its own name
        assert len(client.search_model_versions(f"name = 'vit-{task}'")) == 1
    assert processes_under(temp_root(workdir)) == []
    print(f"\nRELIABILITY driver SIGKILL (two concurrent searches): {len(done_before)} of {2 * num_samples} trials had "
          f"finished; the rerun kept them and ran the other {2 * num_samples - len(done_before)}; {len(trials)} trial "
          "runs, one version each of vit-flowers and vit-garden")
