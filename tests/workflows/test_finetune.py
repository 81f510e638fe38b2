"""A real fine-tuning search: Ray Tune over resolution and learning rate, each trial a Ray Train run from a
registered pre-trained model, on real Flowers-17 shards, tracked in a real MLflow store."""

from __future__ import annotations

import dataclasses

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from vit import VisionTransformer, decode_variant
from vit.checkpoint import model_from_checkpoint
from vit.data import DataConfig, train_loader
from vit.finetune import FinetuneConfig
from vit.loop import TrainConfig, fit
from workflows import tracking
from workflows.stages.finetune import (
    FinetuneSearchConfig,
    _finished_trial_result,
    pareto_front,
    run_finetune,
    trial_configs,
)

CIFAR_NORM = {"mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cifar_shards):
    """A tiny ViT pre-trained for a few steps on real CIFAR-10 shards, registered as vit-pretrained."""
    store = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    data = DataConfig(batch_size=32, num_workers=0, image_size=32, crop_pct=1.0, **CIFAR_NORM)
    loader = train_loader(cifar_shards, data, rank=0, world_size=1)
    model = VisionTransformer(decode_variant("Ti/8", image_size=32, num_classes=10, embed_dim=48, depth=2, num_heads=3))
    fit(model, loader, None, TrainConfig(total_steps=15, log_every=5), report=lambda *a, **k: None)
    run_id = tracking.start_run(uri, "finetune-test", "pretrain")
    logged = tracking.log_vit_model(uri, run_id, model, list(loader.class_names))
    version = tracking.register_model(uri, logged.model_uri, "vit-pretrained", {"variant": "Ti/8"}, run_id)
    tracking.end_run(uri, run_id)
    return uri, version, store


def search_config(store, shards, name: str, **changes) -> FinetuneSearchConfig:
    fields = dict(
        name=name,
        pretrained="models:/vit-pretrained@candidate",
        dataset=str(shards),
        optim={"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0, "warmup_steps": 2},
        data={"batch_size": 16, "num_workers": 0, "crop_scale": (0.5, 1.0), "crop_pct": 1.0, **CIFAR_NORM},
        train={"total_steps": 12, "log_every": 4, "eval_every": 4, "checkpoint_every": 4},
        search={"image_size": [32, 48], "lr": {"min": 1e-4, "max": 0.3}, "num_samples": 6, "max_concurrent_trials": 2,
                # val/loss: on this small validation set early trials often tie on top-1 (all predicting one
                # class), and ASHA stops no trial on a tie.
                "scheduler": {"grace_period": 4, "reduction_factor": 3}, "seed": 5, "metric": "val/loss"},
        resources={"num_workers": 1},
        storage_path=str(store / "runs"),
        tracking={"uri": f"sqlite:///{store / 'mlflow.db'}", "experiment": "finetune-test"},
    )
    fields.update(changes)
    return FinetuneSearchConfig.model_validate(fields)


@pytest.mark.slow
def test_search_registers_a_champion_with_lineage(pretrained, flowers_shards, local_ray):
    uri, pretrained_version, store = pretrained
    client = MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias("vit-pretrained", "candidate", pretrained_version)
    config = search_config(store, flowers_shards, "flowers-search",
                           train={"total_steps": 12, "log_every": 4, "eval_every": 4, "checkpoint_every": 4,
                                  "ema": {"decay": 0.8}})
    result = run_finetune(config)

    # Every trial is a nested MLflow run with its parameters.
    trials = client.search_runs([client.get_experiment_by_name("finetune-test").experiment_id],
                                filter_string=f"tags.`mlflow.parentRunId` = '{result.search_run_id}'")
    assert len(trials) == 6
    for run in trials:
        assert {"image_size", "lr", "model.image_size", "train.optim.optimizer"} <= set(run.data.params)
        assert run.data.params["train.ema.decay"] == "0.8"
        assert run.data.params["model.image_size"] in ("[32, 32]", "[48, 48]")
        # The head fine-tuning started from was exactly zero (logged by rank 0 before the first step).
        assert client.get_metric_history(run.info.run_id, "init/head_abs_max")[0].value == 0.0
    # ASHA stopped at least one trial before the full 12 steps; two resolutions were tried.
    table = pq.read_table(mlflow.artifacts.download_artifacts(result.results_table, tracking_uri=uri)).to_pylist()
    assert len(table) == 6 and {row["image_size"] for row in table} == {32, 48}
    assert any(row["steps"] < 12 for row in table), table
    # The best trial is the one with the lowest validation loss (the search's metric here).
    lowest = min(table, key=lambda row: row["val_loss"])
    assert client.get_run(result.best_run_id).data.tags["vitflow.trial_id"] == lowest["trial_id"]
    # Every trial run is closed: FINISHED when it trained all 12 steps (even when ASHA's stop met its last
    # report), KILLED (stopped early) otherwise; none is left RUNNING.
    steps = {row["trial_id"]: row["steps"] for row in table}
    for run in trials:
        closed = client.get_run(run.info.run_id).info.status
        expected = "FINISHED" if steps[run.data.tags["vitflow.trial_id"]] == 12 else "KILLED"
        assert closed == expected, (run.data.tags["vitflow.trial_id"], closed, steps)
    assert all(row["gflops"] > 0 and row["images_per_sec"] > 0 for row in table)
    # Each trial kept a weight EMA, validated beside its weights; the better of the two is its model.
    assert all(0 <= row["val_ema_top1"] <= 1 and row["weights"] in ("raw", "ema") for row in table), table
    assert {a.path for a in client.list_artifacts(result.search_run_id, "search")} == {"search/trials.parquet", "search/accuracy_vs_gflops.png"}

    # The registered model: lineage tags, champion alias, position embeddings for its own image size.
    version = client.get_model_version("vit-finetuned", result.version)
    assert version.tags["pretrained_model"] == "models:/vit-pretrained@candidate"
    assert version.tags["pretrained_version"] == pretrained_version
    assert version.tags["search_run_id"] == result.search_run_id
    assert version.tags["dataset_fingerprint"] == __import__("json").load(open(flowers_shards / "dataset.json"))["fingerprint"]
    assert str(client.get_model_version_by_alias("vit-finetuned", "champion").version) == result.version and result.champion
    plain = tracking.load_plain_model(uri, "models:/vit-finetuned@champion")
    # ... and that is the model registered, tagged with which weights it holds.
    assert version.tags["weights"] == lowest["weights"] == client.get_run(result.best_run_id).data.tags["vitflow.weights"]
    chosen = model_from_checkpoint(lowest["checkpoint_path"], weights=lowest["weights"])
    for key, value in chosen.state_dict().items():
        torch.testing.assert_close(plain.state_dict[key], value, rtol=0, atol=0, msg=key)
    size = plain.config.image_size[0]
    assert plain.state_dict["pos_embed"].shape == (1, 1 + (size // 8) ** 2, 48)
    assert plain.config.num_classes == 6 and len(plain.class_names) == 6


def test_trial_parameters_reach_the_right_fields(tmp_path, flowers_shards):
    config = search_config(tmp_path, flowers_shards, "x", search={
        "image_size": [48], "lr": {"min": 0.001, "max": 0.1}, "choices": {"train.label_smoothing": [0.1], "data.randaugment": [True]}})
    sections = trial_configs(config, {"image_size": 48, "lr": 0.05, "train.label_smoothing": 0.1, "data.randaugment": True},
                             decode_variant("Ti/8", image_size=32, num_classes=10), num_classes=6)
    assert sections["data"]["image_size"] == 48 and sections["model"]["image_size"] == [48, 48]
    assert sections["train"]["optim"]["lr"] == 0.05 and sections["train"]["label_smoothing"] == 0.1
    assert sections["data"]["randaugment"] is True and sections["model"]["num_classes"] == 6


def test_the_flat_recipe_reaches_every_trial(tmp_path, flowers_shards):
    """mode and optim sit in the section itself; each trial trains with them, at its own lr and resolution,
    and a dump of the section (the trials' copy, the stage's fingerprint) is a valid section again."""
    config = search_config(tmp_path, flowers_shards, "x", mode="linear_probe",
                           optim={"optimizer": "adamw", "weight_decay": 0.01, "warmup_steps": 3},
                           search={"image_size": [32, 48], "lr": {"min": 0.001, "max": 0.1},
                                   "choices": {"optim.momentum": [0.8], "mode": ["full"]}})
    model = decode_variant("Ti/8", image_size=32, num_classes=10)
    sections = trial_configs(config, {"image_size": 32, "lr": 0.02}, model, num_classes=6)
    assert sections["train"]["optim"] == {**config.optim.to_dict(), "lr": 0.02}
    assert sections["train"]["optim"]["optimizer"] == "adamw" and sections["train"]["optim"]["warmup_steps"] == 3
    assert sections["finetune"]["mode"] == "linear_probe" and sections["finetune"]["image_size"] == 32
    chosen = trial_configs(config, {"image_size": 48, "lr": 0.02, "optim.momentum": 0.8, "mode": "full"}, model, num_classes=6)
    assert chosen["finetune"]["mode"] == "full" and chosen["train"]["optim"]["momentum"] == 0.8
    assert config.train.optim == config.optim  # one optimiser, however the config is read
    # Every recipe field a user sets has its key in the section (the resolution is the search's).
    assert {field.name for field in dataclasses.fields(FinetuneConfig)} - {"image_size"} <= set(FinetuneSearchConfig.model_fields)
    dumped = config.model_dump(mode="json")
    assert "image_size" not in dumped["data"] and "optim" not in dumped["train"] and "lr" not in dumped["optim"]
    assert FinetuneSearchConfig.model_validate(dumped).model_dump(mode="json") == dumped


def test_keys_the_search_overwrites_are_refused_at_load_with_their_path(tmp_path, flowers_shards):
    train = {"total_steps": 12, "log_every": 4, "eval_every": 4, "checkpoint_every": 4}
    search = {"image_size": [32], "lr": {"min": 0.01, "max": 0.1}}
    refused = {
        "finetune: the recipe's keys now sit directly in the fine-tune section: write finetune.optim / finetune.mode":
            {"finetune": {"mode": "full", "optim": {"optimizer": "sgd"}}},
        "train.optim: the optimiser is given in one place, the section's optim (finetune.optim in a workflow spec): "
        "move it there": {"train": {**train, "optim": {"lr": 0.5}}},
        "data.image_size: the search's search.image_size chooses the resolution": {"data": {"image_size": 64}},
        "image_size: the search's search.image_size chooses the resolution": {"image_size": 64},
        "optim.lr: the search's search.lr chooses the learning rate": {"optim": {"lr": 0.5}},
        "optim.warmup_steps 20 exceed total_steps 12": {"optim": {"warmup_steps": 20}},
        "optim.layer_decay has no effect in linear_probe mode": {"mode": "linear_probe", "optim": {"layer_decay": 0.7}},
        "data.image_size: not a choice: the search's search.image_size chooses": {"search": {**search, "choices": {"data.image_size": [64]}}},
        "train.optim: not a choice": {"search": {**search, "choices": {"train.optim": [{"lr": 0.1}]}}},
        "train.total_steps: not a choice": {"search": {**search, "choices": {"train.total_steps": [6]}}},
        "train.time_budget_s: not a choice: a search compares trials at equal steps":
            {"search": {**search, "choices": {"train.time_budget_s": [60]}}},
        "train.time_budget_s 60: a search compares its trials at equal steps": {"train": {**train, "time_budget_s": 60}},
        "train.bogus: TrainConfig has no field 'bogus'": {"search": {**search, "choices": {"train.bogus": [1]}}},
        "finetune.mode: choices name fields as data.X, train.X, optim.X or mode": {"search": {**search, "choices": {"finetune.mode": ["full"]}}},
    }
    for message, changes in refused.items():
        with pytest.raises(ValueError) as error:
            search_config(tmp_path, flowers_shards, "x", **{"train": train, "search": search, **changes})
        assert message in str(error.value), (message, str(error.value))


def test_search_configuration_errors(tmp_path, flowers_shards):
    with pytest.raises(ValueError, match="min 0.1 must be below max 0.01"):
        search_config(tmp_path, flowers_shards, "x", search={"image_size": [32], "lr": {"min": 0.1, "max": 0.01}})
    with pytest.raises(ValueError, match="choices name fields"):
        search_config(tmp_path, flowers_shards, "x", search={"image_size": [32], "lr": {"min": 0.01, "max": 0.1}, "choices": {"depth": [2]}})
    with pytest.raises(ValueError, match="grace_period 40 exceeds"):
        search_config(tmp_path, flowers_shards, "x", search={"image_size": [32], "lr": {"min": 0.01, "max": 0.1},
                                                            "scheduler": {"grace_period": 40}})


def test_checkpoints_must_fall_on_evaluations(tmp_path, flowers_shards):
    with pytest.raises(ValueError, match="checkpoint_every 5 must be a multiple of train.eval_every 4"):
        search_config(tmp_path, flowers_shards, "x", train={"total_steps": 12, "eval_every": 4, "checkpoint_every": 5})


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.55), (3.0, 0.58), (0.5, 0.4)]
    assert sorted(pareto_front(points)) == [0, 1, 4]


def test_a_trial_trained_to_its_end_counts_as_finished(tmp_path, flowers_shards):
    """A search driver killed after a trial's last checkpoint and validation were on record, but before its
    run was closed: the rerun reports that trial from its record (a fit resumed at its last step has
    nothing left to report, and Tune rejects a trial that reports no metric). A trial that stopped short
    of the last step is not finished, whatever checkpoints it left."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = DataConfig(batch_size=8, num_workers=0, image_size=32, crop_pct=1.0, **CIFAR_NORM)
    model = VisionTransformer(decode_variant("Ti/8", image_size=32, num_classes=17, embed_dim=24, depth=1, num_heads=2))
    written = tmp_path / "written"
    fit(model, train_loader(flowers_shards, data, rank=0, world_size=1), None,
        TrainConfig(total_steps=4, log_every=2, checkpoint_every=2), report=lambda *a, **k: None, checkpoint_dir=written)
    storage = tmp_path / "trial"
    storage.mkdir()
    (written / "step-000002").rename(storage / "checkpoint_2026-11-24_01-00-00.000001")

    run_id = tracking.start_run(uri, "search", "trial")
    for step in (2, 4):
        tracking.log_metrics(uri, run_id, {"train/loss": 2.0 / step, "val/top1": 0.1 * step}, step=step)
    assert _finished_trial_result(uri, run_id, str(storage), total_steps=4) is None  # last checkpoint: step 2

    (written / "step-000004").rename(storage / "checkpoint_2026-11-24_01-00-09.000001")
    result = _finished_trial_result(uri, run_id, str(storage), total_steps=4)
    assert result is not None and result["step"] == 4 and result["val/top1"] == pytest.approx(0.4)
    assert result["checkpoint_path"].endswith("checkpoint_2026-11-24_01-00-09.000001")
    assert _finished_trial_result(uri, run_id, str(storage), total_steps=6) is None  # trained 4 of 6 steps


@pytest.mark.slow
def test_distillation_from_a_registered_teacher_pinned_to_its_version(pretrained, cifar_shards, flowers_shards,
                                                                    local_ray, tmp_path):
    """A student pre-trained through the real stage (Ray Train) distils from the registered model at the
    teacher's own resolution (student 16 px, teacher 32 px); the alias is pinned to the version it named. A
    teacher for other classes is refused before anything starts, naming the key."""
    from workflows.configs import PretrainConfig
    from workflows.stages.pretrain import run_pretrain

    uri, version, store = pretrained
    client = MlflowClient(uri, registry_uri=uri)
    client.set_registered_model_alias("vit-pretrained", "teacher", version)
    client.set_registered_model_alias("vit-pretrained", "candidate", version)  # the searches' pretrained model
    distill = {"teacher": "models:/vit-pretrained@teacher", "kind": "soft", "alpha": 0.7, "temperature": 2.0}
    # A CIFAR-10 teacher for a Flowers-17 search: other classes.
    wrong = search_config(store, flowers_shards, "distil-wrong",
                          train={"total_steps": 12, "log_every": 4, "eval_every": 4, "checkpoint_every": 4, "distill": distill})
    with pytest.raises(ValueError, match=r"train\.distill\.teacher: the teacher models:/vit-pretrained@teacher predicts "
                                         r"10 classes .* the class maps differ"):
        run_finetune(wrong)
    with pytest.raises(ValueError, match=r"train\.distill: not a choice"):
        search_config(store, flowers_shards, "x", search={"image_size": [32], "lr": {"min": 0.01, "max": 0.1},
                                                         "choices": {"train.distill": [None, distill]}})

    config = PretrainConfig.model_validate({
        "name": "student", "dataset": str(cifar_shards), "register_as": "vit-student",
        "model": {"variant": "Ti/8", "image_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
        "data": {"batch_size": 16, "num_workers": 0, "crop_pct": 1.0, **CIFAR_NORM},
        "train": {"total_steps": 6, "log_every": 3, "distill": distill},
        "storage_path": str(tmp_path / "runs"),
        "tracking": {"uri": uri, "experiment": "finetune-test"},
    })
    result = run_pretrain(config)
    assert result.metrics["step"] == 6 and result.metrics["train/loss"] > 0
    run = client.get_run(result.run_id)
    pinned = f"models:/vit-pretrained/{version}"
    assert run.data.params["train.distill.teacher"] == pinned and run.data.params["train.distill.kind"] == "soft"
    assert client.get_model_version("vit-student", result.version).tags["teacher_model"] == pinned
