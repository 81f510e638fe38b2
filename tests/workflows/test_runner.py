"""Whole workflows from a spec: stages in order on a real local Ray, cached by fingerprint, tracked in a
real MLflow store with a parent run per execution and a nested run per stage."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from vit.data import read_dataset_index
from workflows.runner import WorkflowRunner
from workflows.spec import SpecError, load_spec, parse_spec
from workflows.stages.preflight import PreflightError

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


def two_task_spec(cifar_source, flowers_source, cifar_lr_max: float = 0.03) -> dict:
    """The mini workflow with two downstream tasks: Flowers-17 and the CIFAR-10 subset, shared defaults."""
    data = mini_spec(cifar_source, flowers_source, num_samples=1)
    data["pretrain"]["train"]["total_steps"] = 4
    shared = {key: value for key, value in data["finetune"].items() if key != "dataset"}
    shared["train"] = {"total_steps": 3, "log_every": 3, "eval_every": 3}
    shared["search"] = {**shared["search"], "image_size": [32], "max_concurrent_trials": 1}
    data["finetune"] = {**shared, "tasks": {
        "flowers": {"dataset": "flowers"},
        "cifar": {"dataset": "cifar", "search": {"lr": {"min": 0.003, "max": cifar_lr_max}}},
    }}
    data["evaluate"] = {"split": "test"}
    data["predict"] = {"garden": {"source": str(flowers_source / "test"), "task": "flowers", "top_k": 2}}
    return data


class TrialEvents(tune.Callback):
    """A view of a search that writes down (stage, hook, trial id) of every trial event it is given."""

    def __init__(self, stage: str, seen: list):
        self.stage, self.seen = stage, seen

    def on_trial_start(self, iteration, trials, trial, **info):
        self.seen.append((self.stage, "on_trial_start", trial.trial_id))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        assert result["step"] >= 1 and trial.trial_id in {t.trial_id for t in trials}
        self.seen.append((self.stage, "on_trial_result", trial.trial_id))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.seen.append((self.stage, "on_trial_complete", trial.trial_id))


@pytest.mark.slow
def test_two_tasks_register_two_champions_a_transfer_table_then_reuse_and_rerun_only_what_changed(
        tmp_path, cifar_source, flowers_source, local_ray):
    import pyarrow.parquet as pq

    spec, _ = load_spec(write(tmp_path, two_task_spec(cifar_source, flowers_source)))
    runner = WorkflowRunner(spec)
    seen = []  # what the driver's view of each search is told (their trials run in the searches' own tasks)
    runner.search_callbacks = lambda stage, section: [TrialEvents(stage, seen)]
    first = runner.run(spec_text="x")
    assert not any(r.reused for r in first.values())
    tasks = list(spec.finetune.tasks)  # in the spec file's order
    assert list(first)[2:] == ["pretrain", *[f"finetune:{t}" for t in tasks], *[f"evaluate:{t}" for t in tasks],
                               "predict:garden"]
    assert set(list(first)[:2]) == {"preprocess:cifar", "preprocess:flowers"}  # in parallel: either first
    assert first["finetune:flowers"].model_uri == "models:/vit-flowers/1"
    assert first["finetune:cifar"].model_uri == "models:/vit-cifar/1"
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    # One parent run per execution, a nested run per stage, the spec beside them.
    experiment = client.get_experiment_by_name("mini").experiment_id
    parents = client.search_runs([experiment], "tags.`vitflow.workflow` = 'mini'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(run.data.tags.get("vitflow.stage") for run in children) == sorted(
        ["preprocess", "preprocess", "pretrain", "finetune", "finetune", "evaluate", "evaluate", "predict"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"spec.yaml", "resolved_spec.json"}
    assert first["pretrain"].model_uri == "models:/vit-pretrained/1"
    for name in ("vit-flowers", "vit-cifar"):
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == "1"
        assert champion.tags["pretrained_model"] == "models:/vit-pretrained/1"
    # The two searches ran at the same time, sharing the local Ray: each began before the other ended.
    searches = [client.get_run(first[f"finetune:{t}"].run_id).info for t in tasks]
    assert max(run.start_time for run in searches) < min(run.end_time for run in searches)
    # Each search's trials trained its own task (the searches' trainables do not take each other's place).
    classes = {task: read_dataset_index(first[f"preprocess:{task}"].dataset_uri).num_classes for task in tasks}
    assert classes["flowers"] != classes["cifar"]
    for task in tasks:
        search_id = first[f"finetune:{task}"].run_id
        trials = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{search_id}'")
        assert len(trials) == 1 and trials[0].data.params["model.num_classes"] == str(classes[task])
        assert trials[0].data.tags["vitflow.search_run_id"] == search_id
    # Each search's trial events reached the driver's view, as Tune gives them: started, results, ended.
    for task in tasks:
        events = [(hook, trial) for stage, hook, trial in seen if stage == f"finetune:{task}"]
        assert [hook for hook, _ in events][0] == "on_trial_start" and events[-1][0] == "on_trial_complete"
        assert "on_trial_result" in {hook for hook, _ in events} and len({trial for _, trial in events}) == 1
    # each task's model is evaluated on its own dataset's test split
    evaluations = {r.stage: r for r in first.values() if r.stage.startswith("evaluate:")}
    for task, evaluation in evaluations.items():
        run = client.get_run(evaluation.run_id)
        assert run.data.params["model"] == first[task.replace("evaluate", "finetune")].model_uri
        assert run.data.params["dataset"] == first[f"preprocess:{task.split(':')[1]}"].dataset_uri

    # The transfer table on the workflow's run: one row per task, as Parquet, markdown and a figure.
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "transfer")} == {
        "transfer/transfer_table.parquet", "transfer/transfer_table.md", "transfer/transfer_table.png"}
    table = pq.read_table(client.download_artifacts(parent.info.run_id, "transfer/transfer_table.parquet", str(tmp_path)))
    rows = {row["task"]: row for row in table.to_pylist()}
    assert set(rows) == {"flowers", "cifar"}
    for task, row in rows.items():
        assert row["model"] == f"models:/vit-{task}/1" and row["image_size"] == 32 and row["gflops"] > 0
        assert row["test_top1"] == pytest.approx(first[f"evaluate:{task}"].metrics["test/top1"])
        assert parent.data.metrics[f"transfer/{task}/test_top1"] == pytest.approx(row["test_top1"])
    assert 0 < rows["flowers"]["lr"] <= 0.03

    # The prediction stage: the flowers task's model over a folder of photos, one row each.
    predicted = first["predict:garden"]
    assert predicted.model_uri == "models:/vit-flowers/1" and predicted.output_uri == str(tmp_path / "work" / "predictions" / "garden.parquet")
    rows = pq.read_table(predicted.output_uri).to_pylist()
    assert len(rows) == len(list((flowers_source / "test").rglob("*.jpg"))) == predicted.metrics["images"]
    assert all(row["error"] is None and len(row["top_labels"]) == 2 for row in rows)
    assert client.get_run(predicted.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id

    # Again: every stage reused, nothing registered twice. Then only the cifar task's search changes: only
    # its stages rerun.
    again = WorkflowRunner(spec).run()
    assert all(result.reused for result in again.values())
    assert len(client.search_model_versions("name = 'vit-pretrained'")) == 1
    latest = client.search_runs([experiment], "tags.`vitflow.workflow` = 'mini'", order_by=["attributes.start_time DESC"])[0]
    assert latest.data.tags["vitflow.reused.pretrain"] == first["pretrain"].run_id
    spec3, _ = load_spec(write(tmp_path, two_task_spec(cifar_source, flowers_source, cifar_lr_max=0.02)))
    third = WorkflowRunner(spec3).run()
    assert [name for name, r in third.items() if not r.reused] == ["finetune:cifar", "evaluate:cifar"]
    assert third["predict:garden"].reused  # its model is unchanged
    assert third["finetune:cifar"].model_uri == "models:/vit-cifar/2"
    assert len(client.search_model_versions("name = 'vit-flowers'")) == 1
    # --force reruns a stage even when cached (every task's, for a per-task stage)
    forced = WorkflowRunner(spec3, force={"evaluate"}).run()
    assert {name for name, r in forced.items() if not r.reused} == {"evaluate:flowers", "evaluate:cifar"}
    assert set(WorkflowRunner(spec3, force={"finetune"}).force) >= {"finetune:flowers", "finetune:cifar"}


def test_the_tasks_form_is_checked_key_by_key(tmp_path, cifar_source, flowers_source):
    data = two_task_spec(cifar_source, flowers_source)
    data["finetune"]["tasks"]["cifar"].update({"dataset": "nope", "register_as": "vit-flowers"})
    # (two tasks under one name: the second of them in the file is named, the first in the reason)
    with pytest.raises(SpecError, match=r"finetune\.tasks\.(cifar|flowers)\.register_as: 'vit-flowers' is task '(flowers|cifar)''s too"):
        load_spec(write(tmp_path, data))
    data["finetune"]["tasks"]["cifar"].pop("register_as")
    data["finetune"]["tasks"]["flowers"]["search"] = {"image_size": [33]}
    data["evaluate"] = {"dataset": "flowers"}
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, data))
    message = str(error.value)
    assert "finetune.tasks.cifar.dataset: 'nope' is not a preprocess stage" in message
    assert "finetune.tasks.flowers.search.image_size: [33] not divisible by the pre-trained patch size 8" in message
    assert "evaluate.dataset: with finetune.tasks each task's model is evaluated on its own dataset" in message
    data = two_task_spec(cifar_source, flowers_source)
    data["finetune"]["tasks"] = {}
    with pytest.raises(SpecError, match=r"finetune\.tasks: a mapping of task names to their sections \(at least one\), got \{\}"):
        load_spec(write(tmp_path, data))
    data["finetune"]["tasks"] = {"flowers": {"dataset": "flowers", "bogus": 1}}
    with pytest.raises(SpecError, match=r"finetune\.tasks\.flowers\.bogus: unknown key"):
        load_spec(write(tmp_path, data))

    # predict: whose model, and a Parquet file to write
    data = two_task_spec(cifar_source, flowers_source)
    data["predict"] = {"a": {"source": str(flowers_source)}, "b": {"source": str(flowers_source), "task": "roses"},
                       "c": {"source": str(flowers_source), "task": "flowers", "out": "p.csv"}}
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, data))
    message = str(error.value)
    assert "predict.a.task: which task's model predicts (have: " in message
    assert "predict.b.task: 'roses' is not a task of finetune.tasks" in message
    assert "predict.c.out: must name a .parquet file, got '" in message and "p.csv'" in message
    # checked before any work: a missing source, an out that is a folder
    data["predict"] = {"b": {"source": str(tmp_path / "no-photos"), "task": "flowers"}}
    with pytest.raises(PreflightError, match=r"predict\.b\.source: .*no-photos: no such file or folder"):
        WorkflowRunner(load_spec(write(tmp_path, data))[0]).preflight()
    data["predict"] = {"c": {"source": str(flowers_source), "task": "flowers", "out": str(tmp_path / "taken.parquet")}}
    (tmp_path / "taken.parquet").mkdir()
    with pytest.raises(PreflightError, match=r"predict\.c\.out: .*taken.parquet: is a folder"):
        WorkflowRunner(load_spec(write(tmp_path, data))[0]).preflight()
    del data["finetune"], data["evaluate"]
    data["predict"] = {"a": {"source": str(flowers_source)}}
    with pytest.raises(SpecError, match=r"predict\.a\.model: needed when the spec has no finetune stage"):
        load_spec(write(tmp_path, data))


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
