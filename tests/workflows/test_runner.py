"""Whole workflows from a spec: stages in order on a real local Ray, cached by fingerprint, tracked in a
real MLflow store with a parent run per execution and a nested run per stage."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from workflows.runner import WorkflowRunner
from workflows.spec import SpecError, load_spec, parse_spec

NORM = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "crop_pct": 1.0}


def mini_spec(cifar_source, flowers_source, num_samples: int = 2) -> dict:
    return {
        "name": "mini",
        "workdir": "work",
        "tracking": {"experiment": "mini"},
        "preprocess": {
            "cifar": {"source": str(cifar_source), "config": {"val_fraction": 0.2, "max_shard_samples": 100}},
            "flowers": {"source": str(flowers_source), "config": {"max_size": 64, "val_fraction": 0.25, "max_shard_samples": 24}},
        },
        "pretrain": {"dataset": "cifar", "model": {"variant": "Ti/8", "image_size": 32, "embed_dim": 48, "depth": 2, "num_heads": 3},
                     "data": {"batch_size": 32, "num_workers": 0, **NORM},
                     "train": {"total_steps": 10, "log_every": 5, "checkpoint_every": 5}},
        "finetune": {"dataset": "flowers", "data": {"batch_size": 16, "num_workers": 0, **NORM},
                     "train": {"total_steps": 6, "log_every": 3, "eval_every": 3},
                     "search": {"image_size": [32, 48], "lr": {"min": 0.003, "max": 0.03}, "num_samples": num_samples,
                                "max_concurrent_trials": 2}},
        "evaluate": {"dataset": "flowers"},
    }


def write(tmp_path, data: dict):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_workflow_runs_then_reuses_then_reruns_only_what_changed(tmp_path, cifar_source, flowers_source, local_ray):
    data = mini_spec(cifar_source, flowers_source)
    spec, _ = load_spec(write(tmp_path, data))
    events = []
    first = WorkflowRunner(spec, on_event=lambda *e: events.append(e)).run(spec_text="x")
    assert set(first) == {"preprocess:cifar", "preprocess:flowers", "pretrain", "finetune", "evaluate"}
    assert not any(r.reused for r in first.values())
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("mini").experiment_id
    parents = client.search_runs([experiment], "tags.`vitflow.workflow` = 'mini'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert {run.data.tags.get("vitflow.stage") for run in children} == {"preprocess", "pretrain", "finetune", "evaluate"}
    assert first["pretrain"].model_uri == "models:/vit-pretrained/1"
    assert first["finetune"].model_uri == "models:/vit-finetuned/1"
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"spec.yaml", "resolved_spec.json"}

    # The same spec again: every stage is reused, nothing is registered twice.
    again = WorkflowRunner(spec).run()
    assert all(result.reused for result in again.values())
    assert len(client.search_model_versions("name = 'vit-pretrained'")) == 1
    assert len(client.search_model_versions("name = 'vit-finetuned'")) == 1
    latest = client.search_runs([experiment], "tags.`vitflow.workflow` = 'mini'", order_by=["attributes.start_time DESC"])[0]
    assert latest.data.tags["vitflow.reused.pretrain"] == first["pretrain"].run_id

    # Only the search changed: preprocessing and pre-training are reused, fine-tuning and evaluation rerun.
    spec3, _ = load_spec(write(tmp_path, mini_spec(cifar_source, flowers_source, num_samples=3)))
    third = WorkflowRunner(spec3).run()
    assert [name for name, r in third.items() if not r.reused] == ["finetune", "evaluate"]
    assert third["finetune"].model_uri == "models:/vit-finetuned/2"

    # --force reruns a stage even when cached.
    forced = WorkflowRunner(spec3, force={"evaluate"}).run()
    assert [name for name, r in forced.items() if not r.reused] == ["evaluate"]


def test_spec_errors_name_file_key_and_reason(tmp_path, cifar_source, flowers_source):
    data = mini_spec(cifar_source, flowers_source)
    data["pretrain"]["train"]["total_steps"] = "many"
    data["finetune"]["search"]["bogus"] = 1
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, data))
    message = str(error.value)
    assert str(tmp_path / "spec.yaml") in message
    assert "pretrain.train.total_steps" in message and "finetune.search.bogus: unknown key" in message

    data = mini_spec(cifar_source, flowers_source)
    data["finetune"]["search"]["image_size"] = [32, 36]
    with pytest.raises(SpecError, match=r"finetune.search.image_size: \[36\] not divisible by the pre-trained patch size 8"):
        parse_spec(data, tmp_path / "x.yaml")
    data = mini_spec(cifar_source, flowers_source)
    del data["pretrain"]
    with pytest.raises(SpecError, match="finetune.pretrained: needed"):
        parse_spec(data, tmp_path / "x.yaml")
    data["finetune"]["pretrained"] = "vit-pretrained-3"
    with pytest.raises(SpecError, match="is not a model URI"):
        parse_spec(data, tmp_path / "x.yaml")
    data = mini_spec(cifar_source, flowers_source)
    data["pretrain"]["train"]["distill"] = {"teacher": "models:/vit-b16@champion", "kind": "soft", "tau": 2}
    with pytest.raises(SpecError, match=r"pretrain\.train\.distill\.tau: unknown key"):
        parse_spec(data, tmp_path / "x.yaml")
    data = mini_spec(cifar_source, flowers_source)
    data["finetune"]["train"]["distill"] = {"teacher": "vit-finetuned-champion"}
    with pytest.raises(SpecError, match=r"finetune\.train\.distill\.teacher: 'vit-finetuned-champion' is not a model URI"):
        parse_spec(data, tmp_path / "x.yaml")


def test_quickstart_and_gpu_recipe_validate():
    from pathlib import Path

    for name in ("quickstart.yaml", "imagenet21k-vit-b16.yaml"):
        spec, _ = load_spec(Path(__file__).resolve().parents[2] / "workflows" / name)
        assert spec.finetune is not None and spec.pretrain is not None
