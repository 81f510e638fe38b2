"""A workflow whose every location is an object-store URI: shards, checkpoints and Tune's state land in the
bucket, and nothing of the dataset or the checkpoints on the local disk (the mini workflow, run once per
session against the test SeaweedFS, see tests/conftest.py)."""

from __future__ import annotations

import json
import re

import pytest
from mlflow.tracking import MlflowClient

from workflows import tags as tag
from workflows.spec import WorkflowSpec, load_spec
from workflows.stages.preflight import PreflightError, check_storage


def test_shards_checkpoints_and_tune_state_are_in_the_bucket_and_not_on_disk(mini_workflow, object_store):
    stored = object_store.objects(mini_workflow.bucket)
    for corpus in ("cifar", "flowers"):
        info = json.loads(stored[f"shards/{corpus}/dataset.json"])
        shards = [s["path"] for split in info["splits"].values() for s in split["shards"]]
        assert shards and all(f"shards/{corpus}/{path}" in stored for path in shards)
    checkpoints = [name for name in stored if re.match(r"runs/mini-pretrain-[0-9a-f]{10}/checkpoint_", name)]
    assert checkpoints, sorted(stored)
    tune_state = [name for name in stored if re.match(r"runs/mini-finetune-[0-9a-f]{10}/experiment_state", name)]
    assert tune_state, sorted(stored)

    # The stage results point into the bucket.
    client = MlflowClient(mini_workflow.tracking_uri)
    experiment = client.get_experiment_by_name("mini").experiment_id
    results = [json.loads(run.data.tags[tag.RESULT]) for run in client.search_runs([experiment])
               if tag.RESULT in run.data.tags]
    assert {r["dataset_uri"] for r in results if r["stage"].startswith("preprocess:")} == {
        f"{mini_workflow.bucket}/shards/cifar", f"{mini_workflow.bucket}/shards/flowers"}

    # On the local disk: the spec, the tracking store (MLflow's own artifacts) and the log; no shard, no
    # dataset index, no checkpoint.
    local = [p for p in mini_workflow.spec.parent.rglob("*") if p.is_file()]
    assert all(p == mini_workflow.spec or p.is_relative_to(mini_workflow.workdir) for p in local), local
    outside_mlflow = [p.relative_to(mini_workflow.workdir).as_posix() for p in local
                      if p.is_relative_to(mini_workflow.workdir)
                      and not p.relative_to(mini_workflow.workdir).as_posix().startswith(("mlflow.db", "mlartifacts/"))]
    assert all(name.startswith("logs/ray-") and name.endswith(".log") for name in outside_mlflow), outside_mlflow
    # (A logged model carries vit's source, vit/checkpoint.py among it: a checkpoint is a Ray
    # checkpoint_NNNNNN folder or a step-NNNNNN folder holding checkpoint.pt, wherever it lies.)
    assert not [p for p in local if p.suffix == ".tar" or any(part.startswith(("checkpoint_", "step-")) for part in p.parts)
                or p.name == "checkpoint.pt"], local


def _spec(tmp_path, **changes) -> WorkflowSpec:
    import yaml

    data = {"name": "s", "workdir": str(tmp_path / "work"),
            "preprocess": {"c": {"source": str(tmp_path)}},
            "pretrain": {"dataset": "c", "model": {"variant": "Ti/8", "image_size": 32}, "train": {"total_steps": 1}}}
    for key, value in changes.items():
        if key == "out":
            data["preprocess"]["c"]["out"] = value
        else:
            data[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)[0]


def test_the_preflight_names_the_key_of_a_missing_bucket_or_corpus(bucket, tmp_path, monkeypatch):
    check_storage(_spec(tmp_path, out=f"{bucket}/shards", storage_path=f"{bucket}/runs"), f"{bucket}/runs")
    with pytest.raises(PreflightError, match=r"preprocess\.c\.out: s3://no-such-bucket-9/shards: bucket 'no-such-bucket-9' does not exist"):
        check_storage(_spec(tmp_path, out="s3://no-such-bucket-9/shards"), None)
    with pytest.raises(PreflightError, match=r"storage_path: s3://no-such-bucket-9/runs: bucket"):
        check_storage(_spec(tmp_path, storage_path="s3://no-such-bucket-9/runs"), "s3://no-such-bucket-9/runs")
    with pytest.raises(PreflightError, match=r"VITFLOW_STORAGE: s3://no-such-bucket-9/runs: bucket"):
        check_storage(_spec(tmp_path), "s3://no-such-bucket-9/runs")  # from the environment on a cluster
    spec = _spec(tmp_path).model_copy(update={"preprocess": {"c": _spec(tmp_path).preprocess["c"].model_copy(
        update={"source": f"{bucket}/no/corpus"})}})
    with pytest.raises(PreflightError, match=rf"preprocess\.c\.source: {bucket}/no/corpus: no such object or prefix"):
        check_storage(spec, None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(PreflightError, match=rf"preprocess\.c\.out: {bucket}/shards: cannot reach its store"):
        check_storage(_spec(tmp_path, out=f"{bucket}/shards"), None)

