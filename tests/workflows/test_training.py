"""The training function every worker and in-process trial runs (workflows.compute.training._train), outside Ray:
real CIFAR-10 shards, a real MLflow store. It records the precision it resolved on its device (forced to a
CPU without bf16 by capping oneDNN's ISA in a subprocess), the hardware it resolved it for, the speed
figures and the machine's system metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from vit import probe, resolve_precision
from workflows import tracking

ROOT = Path(__file__).parents[2]

TRAIN = """
import json, sys, torch
from vit import ViTConfig
from vit.data import DataConfig
from vit.loop import TrainConfig
from workflows.compute.training import WorkerSession, WorkerSpec, _train
cfg = json.loads(sys.argv[1])
spec = WorkerSpec(model=ViTConfig.from_dict(cfg.pop("model")), data=DataConfig.from_dict(cfg.pop("data")),
                  train=TrainConfig.from_dict(cfg.pop("train")), class_names=tuple(cfg.pop("class_names")), **cfg)
reports = []
_train(spec, WorkerSession(rank=0, world_size=1, device=torch.device("cpu"), registered_checkpoint=lambda folder: None,
                          report=lambda metrics, checkpoint_dir: reports.append(metrics)))
print(json.dumps(reports))
"""


def train(tmp_path: Path, shards: Path, name: str, **env: str) -> tuple[MlflowClient, str, list[dict]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "training", name)
    cfg = {
        "model": {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10},
        "data": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 32, "image_size": 32, "crop_pct": 1.0},
        "train": {"total_steps": 4, "log_every": 2, "eval_every": 4},
        "dataset": str(shards), "train_split": "train", "val_split": "val", "class_names": [str(i) for i in range(10)],
        "tracking_uri": uri, "run_id": run_id,
    }
    done = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(cfg)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tracking.end_run(uri, run_id)
    return MlflowClient(uri), run_id, json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("forced", [True, False], ids=["cpu-without-bf16", "this-cpu"])
def test_the_worker_records_its_precision_speed_and_machine(tmp_path, cifar_shards, forced):
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"} if forced else {}
    client, run_id, reports = train(tmp_path, cifar_shards, "forced" if forced else "native", **env)
    run = client.get_run(run_id)
    expected = "fp32" if forced else resolve_precision("auto", probe("cpu"))
    assert run.data.params["precision"] == expected
    assert run.data.tags["system.native_bf16"] == str(expected == "bf16")
    if forced:
        assert run.data.tags["system.device_capability"] == "AVX2"
    assert [r["step"] for r in reports] == [2, 4]
    for metrics in reports:
        assert 0 < metrics["perf/mfu"] < 1 and 0 <= metrics["perf/data_wait_fraction"] <= 1
    metrics = run.data.metrics
    assert {"perf/mfu", "perf/images_per_sec", "perf/data_wait_fraction"} <= set(metrics)
    # one worker: MLflow's own names, at least one sample however short the run
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_a_worker_spec_is_checked_where_the_stage_builds_it():
    """What crosses to the workers is typed: a misspelt or missing field fails on the driver, at once."""
    import dataclasses

    from vit import ViTConfig
    from vit.data import DataConfig
    from vit.loop import TrainConfig
    from workflows.compute.training import WorkerSpec

    fields = dict(model=ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=2),
                  data=DataConfig(), train=TrainConfig(total_steps=1), dataset="/data/shards", class_names=("a", "b"),
                  tracking_uri="sqlite:///mlflow.db", run_id="run")
    spec = WorkerSpec(**fields)
    assert spec.train_split == "train" and spec.pretrained is None
    with pytest.raises(TypeError, match="tarin_split"):
        WorkerSpec(**fields, tarin_split="train")
    with pytest.raises(TypeError, match="run_id"):
        WorkerSpec(**{k: v for k, v in fields.items() if k != "run_id"})
    with pytest.raises(ValueError, match="fault_marker"):
        WorkerSpec(**fields, fail_at_step=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.run_id = "other"  # type: ignore[misc]
