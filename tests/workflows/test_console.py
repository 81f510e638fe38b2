"""`vitflow run`'s console: one clean view of the workflow on the terminal, Ray's and Tune's own output in
a log file under the working directory, and ``--verbose`` to see that output on the terminal again.
Real CLI, real Ray (the workflow's own), real MLflow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.faults.conftest import vitflow
from tests.workflows.test_runner import mini_spec

pytestmark = pytest.mark.slow

RAY_NOISE = ("Trial status", "│", "╭", "Trial name", "started with configuration", "core_worker", "PlacementGroupCleaner",
             "PreemptionWatcher", "pid=", "Started monitoring system metrics", "INFO mlflow")


def test_run_shows_one_clean_view_and_keeps_ray_output_in_a_log_file(mini_workflow):
    shown = mini_workflow.stdout + mini_workflow.stderr  # `vitflow run` of the mini workflow, as a user sees it
    for noise in RAY_NOISE:
        assert noise not in shown, (noise, shown)
    for stage in ("preprocess:cifar", "preprocess:flowers", "pretrain", "finetune", "evaluate"):
        assert re.search(rf"{re.escape(stage)}: started", shown) and re.search(rf"{re.escape(stage)}: done in", shown), (stage, shown)
    # Pre-training's progress, each step once (Ray forwards the worker's line; the view shows it once).
    for step in (5, 10):
        assert len(re.findall(rf"pretrain: step {step}/10 \| loss", shown)) == 1, shown
    # The search: its trials and the best so far, from Tune's callback on the driver.
    assert len(re.findall(r"finetune: trial \w+ started: image_size", shown)) == 2, shown
    assert re.search(r"trials: \d done, \d stopped, 0 failed, \d running; best so far", shown), shown
    assert "models:/vit-finetuned/1" in shown and "browse the runs and models: vitflow ui" in shown

    log = Path(re.search(r"Ray's and Tune's log: (\S+)", shown).group(1))
    assert log.parent == mini_workflow.workdir / "logs" and log.is_file()
    written = log.read_text()
    assert "pid=" in written and "step 5/10" in written  # the workers' output Ray forwarded
    assert "Trial status" in written or "Trial name" in written  # Tune's own reporting


def test_verbose_shows_rays_own_output(tmp_path, cifar_source):
    data = mini_spec(cifar_source, cifar_source)
    data = {**{k: data[k] for k in ("name", "workdir", "tracking")}, "ray": {"num_cpus": 2},
            "preprocess": {"cifar": data["preprocess"]["cifar"]}, "pretrain": data["pretrain"]}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    verbose = vitflow("run", str(spec), "--verbose", cwd=tmp_path, timeout_s=900)
    shown = verbose.stdout + verbose.stderr
    assert verbose.returncode == 0, shown
    assert re.search(r"\(\w+ pid=\d+\).*step 5/10", shown), shown  # a worker's line, as Ray forwards it
    assert "preprocess:cifar: started" in shown and "pretrain: done in" in shown  # the view is there too


def test_a_failing_stage_shows_its_error_and_the_log_file(tmp_path, cifar_source):
    data = mini_spec(cifar_source, cifar_source)
    data = {**{k: data[k] for k in ("name", "workdir", "tracking")}, "ray": {"num_cpus": 2},
            "preprocess": {"cifar": data["preprocess"]["cifar"]},
            "pretrain": {**data["pretrain"], "max_failures": 0, "fail_at_step": 5}}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    result = vitflow("run", str(spec), cwd=tmp_path, timeout_s=900)
    shown = result.stdout + result.stderr
    assert result.returncode != 0, shown
    assert re.search(r"pretrain: FAILED after .*Ray's and Tune's log: \S+\.log", result.stdout), shown
    assert "fault drill: rank 0 fails at step 5" in shown  # the worker's error itself, not only "see the log"
    log = Path(re.search(r"Ray's and Tune's log: (\S+\.log)", result.stdout).group(1))
    assert log.is_file() and "fault drill" in log.read_text()
