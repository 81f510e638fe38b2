"""`vitflow evaluate`: metrics that match a direct computation, the confusion matrix and the paper's figures,
logged as a child of the model's run in a real MLflow store. No Ray involved."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from vit import VisionTransformer, decode_variant
from vit.data import DataConfig, eval_loader, train_loader
from vit.loop import TrainConfig, fit
from workflows import tracking
from workflows.stages.evaluate import EvaluateConfig, run_evaluate
from workflows.tracking.runs import _using

NORM = {"mean": (0.5, 0.45, 0.4), "std": (0.25, 0.25, 0.25)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, flowers_shards):
    """A tiny ViT trained for a few steps on real Flowers-17 shards, logged and registered."""
    store = tmp_path_factory.mktemp("eval-store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    data = DataConfig(batch_size=16, num_workers=0, image_size=32, crop_pct=1.0, **NORM)
    model = VisionTransformer(decode_variant("Ti/8", image_size=32, num_classes=6, embed_dim=48, depth=2, num_heads=3))
    fit(model, train_loader(flowers_shards, data, rank=0, world_size=1), None, TrainConfig(total_steps=10, log_every=5),
        report=lambda *a, **k: None)
    run_id = tracking.start_run(uri, "eval-test", "train")
    environment = dict(os.environ)
    logged = tracking.log_vit_model(uri, run_id, model, json.load(open(flowers_shards / "dataset.json"))["class_names"],
                                    preprocessing=tracking.preprocessing_of(data))
    version = tracking.register_model(uri, logged.model_uri, "vit-finetuned", {}, run_id)
    tracking.end_run(uri, run_id)
    # MLflow's fluent API exports MLFLOW_TRACKING_URI; vitflow must not leave it behind for later work
    assert dict(os.environ) == environment
    # What loading the model needs, stated rather than inferred by MLflow (no guessed extras)
    with _using(uri):
        requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/vit-finetuned/{version}")).read_text().split()
    assert sorted(r.split("==")[0] for r in requirements) == ["mlflow", "pillow", "torch", "torchvision"], requirements
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert f"torchvision=={torchvision.__version__.split('+')[0]}" in requirements
    return uri, run_id, version, model.eval(), data


def test_metrics_match_a_direct_computation(trained, flowers_shards):
    uri, train_run, version, model, data = trained
    result = run_evaluate(EvaluateConfig(model=f"models:/vit-finetuned/{version}", dataset=str(flowers_shards),
                                         tracking={"uri": uri, "experiment": "eval-test"}))
    # Directly: every test image through the model, counted by hand.
    images, labels = zip(*[(b[0], b[1]) for b in eval_loader(flowers_shards, data, rank=0, world_size=1, split="test")])
    with torch.no_grad():
        logits = model(torch.cat(images))
    labels = torch.cat(labels)
    assert result.num_samples == len(labels) == 24
    assert result.top1 == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    assert result.top5 == pytest.approx(top5)
    for k, name in enumerate(json.load(open(flowers_shards / "dataset.json"))["class_names"]):
        mask = labels == k
        assert result.per_class_accuracy[name] == pytest.approx((logits[mask].argmax(1) == k).float().mean().item())

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == train_run  # a child of the model's own run
    assert run.data.metrics["test/top1"] == pytest.approx(result.top1)
    artifacts = {a.path for folder in ("evaluation", "figures") for a in client.list_artifacts(result.run_id, folder)}
    assert artifacts == {"evaluation/confusion_matrix.png", "evaluation/confusion_matrix.parquet",
                         "figures/patch_embedding_pcs.png", "figures/position_similarity.png",
                         "figures/attention_distance.png", "figures/attention_rollout.png"}
    table = pq.read_table(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="evaluation/confusion_matrix.parquet",
                                                              tracking_uri=uri)).to_pylist()
    assert sum(row[row["true_class"]] for row in table) == round(result.top1 * 24)
    assert sum(v for row in table for k, v in row.items() if k not in ("true_class", "accuracy")) == 24
    png = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="figures/attention_rollout.png", tracking_uri=uri)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_uri_and_class_map_mismatch(trained, flowers_shards, cifar_shards):
    uri, train_run, _, _, _ = trained
    config = EvaluateConfig(model=f"runs:/{train_run}/model", dataset=str(cifar_shards), tracking={"uri": uri})
    with pytest.raises(ValueError, match="the class maps differ"):
        run_evaluate(config)
    with pytest.raises(ValueError, match="cannot be resolved"):
        run_evaluate(EvaluateConfig(model="models:/no-such-model/1", dataset=str(flowers_shards), tracking={"uri": uri}))
