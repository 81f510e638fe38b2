"""Pre-training on a real 2-worker Ray Train run over real CIFAR-10 shards, tracked in a real MLflow store."""

from __future__ import annotations

import base64
import tarfile

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from vit import VisionTransformer, probe, resolve_precision
from vit.checkpoint import model_from_checkpoint
from vit.ema import better_weights
from vit.inference import ImageClassifier
from workflows import tracking
from workflows.stages.pretrain import PretrainConfig, run_pretrain
from workflows.tracking.runs import _using

DATA = {"batch_size": 32, "num_workers": 1, "shuffle_buffer": 64, "crop_scale": (0.5, 1.0), "mean": (0.49, 0.48, 0.45),
        "std": (0.25, 0.24, 0.26)}


def config(tmp_path, shards, name: str, **changes) -> PretrainConfig:
    fields = dict(
        name=name,
        dataset=str(shards),
        model={"variant": "Ti/8", "image_size": 32, "embed_dim": 48, "depth": 2, "num_heads": 3},
        data=DATA,
        train={"total_steps": 30, "log_every": 5, "checkpoint_every": 10, "optim": {"lr": 2e-3, "warmup_steps": 3, "weight_decay": 0.0}},
        resources={"num_workers": 2},
        storage_path=str(tmp_path / "runs"),
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "pretrain-test"},
    )
    fields.update(changes)
    return PretrainConfig.model_validate(fields)


def cifar_image(shards, i: int) -> bytes:
    """The i-th image of the shards' test split, encoded as stored (the pipeline's JPEG)."""
    shard = sorted((shards / "test").glob("test-*.tar"))[0]
    with tarfile.open(shard) as tar:
        return tar.extractfile([m for m in tar.getmembers() if m.name.endswith(".jpg")][i]).read()


def loss_history(uri: str, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
def test_two_workers_learn_resume_after_a_failure_register_and_reload(tmp_path, cifar_shards, local_ray):
    # Rank 0 fails once at step 12 and no restart is allowed: the run fails, its MLflow run holding steps 5
    # and 10. Run again, it continues the same MLflow run from the step-10 checkpoint (not from 0) and stops
    # at exactly the configured 30 steps: each step is logged once. (A worker group Ray Train replaces within
    # one run: tests/faults/test_training_faults.py, a worker SIGKILLed; tests/workflows/test_cluster.py, a
    # node lost.) With the training pack on: a recipe (augreg-light: RandAugment, AdamW, clipping) under the
    # section's own keys, MixUp, repeated augmentation (each image's 2 copies on the 2 ranks) and a weight
    # EMA, its state resumed with the rest.
    data = {**DATA, "mixup_alpha": 0.2, "repeated_augmentation": 2}
    settings = config(tmp_path, cifar_shards, "ddp-2", fail_at_step=12, max_failures=0, data=data, recipe="augreg-light",
                      train={"total_steps": 30, "log_every": 5, "checkpoint_every": 10, "ema": {"decay": 0.8},
                             "optim": {"lr": 2e-3, "warmup_steps": 3, "weight_decay": 0.0}})
    uri = settings.tracking.uri
    client = MlflowClient(uri, registry_uri=uri)
    with pytest.raises(Exception, match="fault drill"):
        run_pretrain(settings)
    assert (tmp_path / "runs" / "ddp-2.fault-injected").is_file()  # the drill did fire
    first = tracking.find_run(uri, "pretrain-test", {"vitflow.run_name": "ddp-2"})
    assert [step for step, _ in loss_history(uri, first)] == [5, 10]
    assert client.get_run(first).info.status == "FAILED"
    result = run_pretrain(settings)
    assert result.run_id == first  # the same MLflow run continues
    history = loss_history(uri, result.run_id)
    assert [step for step, _ in history] == [5, 10, 15, 20, 25, 30]
    assert np.mean([v for _, v in history[-2:]]) < history[0][1]  # the loss goes down
    assert result.metrics["step"] == 30 and "val/top1" in result.metrics and "val_ema/top1" in result.metrics

    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.embed_dim"] == "48" and run.data.params["train.total_steps"] == "30"
    # precision: auto, resolved on the worker's CPU (bf16 only where it is native), recorded as a param
    assert run.data.params["train.precision"] == "auto"
    assert run.data.params["precision"] == resolve_precision("auto", probe("cpu"))
    # speed per logging window, and each worker's machine (CPU, memory) as MLflow system metrics
    metrics = run.data.metrics
    assert 0 < metrics["perf/mfu"] < 1 and 0 <= metrics["perf/data_wait_fraction"] <= 1
    assert metrics["perf/images_per_sec"] > 0
    cpu = [key for key in metrics if key.startswith("system/") and key.endswith("/cpu_utilization_percentage")]
    assert sorted(key.split("/")[1].split("-")[0] for key in cpu) == ["rank0", "rank1"], cpu
    assert any(key.endswith("/system_memory_usage_megabytes") for key in metrics)
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == result.dataset_fingerprint[:36]
    version = client.get_model_version("vit-pretrained", result.version)
    assert version.run_id == result.run_id
    assert version.tags["variant"] == "Ti/8" and version.tags["image_size"] == "32" and version.tags["steps"] == "30"
    assert version.tags["dataset_fingerprint"] == result.dataset_fingerprint
    # A weight EMA was kept (resumed with the rest after the failure): the better on validation is registered.
    assert run.data.params["train.ema.decay"] == "0.8"
    assert run.data.params["data.repeated_augmentation"] == "2" and run.data.params["data.mixup_alpha"] == "0.2"
    assert run.data.params["recipe"] == "augreg-light" and run.data.params["data.randaugment"] == "True"  # the recipe's
    assert run.data.params["train.optim.lr"] == "0.002"  # the section's own, over the recipe's 0.001
    assert version.tags["weights"] == better_weights(result.metrics) == run.data.tags["vitflow.weights"]

    # The registered model loads back, both ways, and gives identical logits.
    plain = tracking.load_plain_model(uri, f"models:/vit-pretrained/{result.version}")
    model = VisionTransformer(plain.config).eval()
    model.load_state_dict(plain.state_dict)
    final = sorted(p for p in (tmp_path / "runs" / "ddp-2").glob("checkpoint_*") if p.is_dir())[-1]  # named by time
    chosen = model_from_checkpoint(final, weights=version.tags["weights"])
    for key, value in chosen.state_dict().items():
        torch.testing.assert_close(plain.state_dict[key], value, rtol=0, atol=0, msg=key)
    # ... and its pyfunc (what `mlflow models serve` runs) classifies real CIFAR-10 images as the plain model
    # does with the run's own preprocessing (its mean and std, not ImageNet's)
    assert plain.preprocessing["mean"] == list(DATA["mean"]) and plain.preprocessing["image_size"] == 32
    photos = [cifar_image(cifar_shards, i) for i in range(4)]
    with _using(uri):
        served = mlflow.pyfunc.load_model(f"models:/vit-pretrained/{result.version}").predict(
            pd.DataFrame({"image": [base64.b64encode(photo).decode() for photo in photos]}))
    expected = ImageClassifier(model, plain.class_names, plain.preprocessing, precision="auto").classify(photos)
    assert list(served["label"]) == [p.label for p in expected]
    np.testing.assert_allclose(served["score"], [p.score for p in expected], rtol=0, atol=0)
    assert [tuple(labels) for labels in served["top_labels"]] == [p.top_labels for p in expected]

    # Running the finished configuration again reuses it: no second version.
    again = run_pretrain(settings)
    assert (again.run_id, again.version) == (result.run_id, result.version)
    assert len(client.search_model_versions("name = 'vit-pretrained'")) == 1


@pytest.mark.slow
def test_a_time_budget_ends_the_stage_on_the_clock_and_the_registry_says_how_far_it_got(tmp_path, cifar_shards, local_ray):
    # train.time_budget_s: the run takes as many steps as its 20 seconds allow (the 10,000 are only a
    # ceiling), the cosine fitted to them; the plan is logged as it moves and the model's tags say the steps
    # taken. One worker: the ranks' agreement is tests/vit/test_loop.py's.
    settings = config(tmp_path, cifar_shards, "budget", resources={"num_workers": 1},
                      train={"total_steps": 10_000, "log_every": 2, "eval_every": 40, "checkpoint_every": 40,
                             "time_budget_s": 20, "optim": {"lr": 2e-3, "warmup_steps": 3, "min_lr_ratio": 0.1}})
    result = run_pretrain(settings)
    uri = settings.tracking.uri
    client = MlflowClient(uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    assert run.data.params["train.time_budget_s"] == "20.0" and run.data.params["train.total_steps"] == "10000"
    steps = int(result.metrics["step"])
    planned = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "train/planned_steps"))
    assert 5 < steps < 10_000 and planned[-1] == (steps, steps), planned
    left = client.get_metric_history(result.run_id, "train/budget_left_s")
    assert min(m.value for m in left) > -5, left  # within a few seconds of the budget at worst
    lrs = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "train/lr"))
    # the cosine fitted to the steps taken: at (or, on a loaded machine where the budget ran out faster than
    # the last plan expected, near) its floor at the last step; over 10,000 steps it would be at its peak
    assert lrs[-1][1] < 0.5 * 2e-3 and lrs[-1][0] == steps
    version = client.get_model_version("vit-pretrained", result.version)
    assert version.tags["steps"] == str(steps)


def test_configuration_errors_name_the_key(tmp_path, cifar_shards):
    with pytest.raises(ValidationError, match=r"train\.optim\.lr"):
        config(tmp_path, cifar_shards, "x", train={"total_steps": 5, "optim": {"lr": "fast"}})
    with pytest.raises(ValidationError, match="not divisible by patch_size"):
        config(tmp_path, cifar_shards, "x", model={"variant": "Ti/8", "image_size": 36})
    with pytest.raises(ValidationError, match="unknown model option"):
        config(tmp_path, cifar_shards, "x", model={"variant": "Ti/8", "image_size": 32, "hidden": 3})
    # data.image_size would be replaced by the model's resolution: refused by name (the same value is fine)
    with pytest.raises(ValidationError, match=r"data\.image_size: 48 is not the model's resolution 32"):
        config(tmp_path, cifar_shards, "x", data={"batch_size": 8, "image_size": 48})
    assert config(tmp_path, cifar_shards, "x", data={"batch_size": 8, "image_size": 32}).data.image_size == 32
    with pytest.raises(ValidationError, match=r"train\.ema\.bogus"):
        config(tmp_path, cifar_shards, "x", train={"total_steps": 5, "ema": {"decay": 0.99, "bogus": 1}})
    with pytest.raises(ValidationError, match=r"train\.ema[\s\S]*decay must be in \(0, 1\)"):
        config(tmp_path, cifar_shards, "x", train={"total_steps": 5, "ema": {"decay": 1.0}})
    with pytest.raises(ValidationError, match=r"train[\s\S]*time_budget_s must be a number of seconds > 0"):
        config(tmp_path, cifar_shards, "x", train={"total_steps": 5, "time_budget_s": 0})
    with pytest.raises(ValidationError, match="resources.gpus"):
        config(tmp_path, cifar_shards, "x", resources={"gpus": 2})
    with pytest.raises(ValidationError, match="name"):
        config(tmp_path, cifar_shards, "bad name/with slash")
