"""The pre-training stage: Ray Train (V2) runs ``vit.loop.fit`` with DDP over WebDataset shards;
MLflow records the run; the final model is registered as ``vit-pretrained``.

Fault tolerance is Ray Train's: ``FailureConfig(max_failures)`` replaces a failed worker group and the
training function resumes from ``ray.train.get_checkpoint()``. A rerun with the same ``name`` and
``storage_path`` resumes the same Ray Train run (its snapshot holds the latest checkpoint) and logs into
the same MLflow run, so an interrupted pre-training picks up where it stopped.

A tracking server that goes away does not stop training: metrics are buffered and sent when it is back.
If it is still away when training ends, the model and the unsent metrics are kept beside the
checkpoints (``<storage>/<name>/mlflow-offline``) and ``vitflow upload`` sends them later.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from vit import gflops
from vit.checkpoint import model_from_checkpoint
from vit.data import check_dataset, read_dataset_index
from vit.ema import better_weights
from workflows import tags as tag
from workflows import tracking
from workflows.compute.training import (
    WorkerSpec,
    pin_teacher,
    system_tags,
    torch_trainer,
)
from workflows.configs import (
    PretrainConfig,
    PretrainSettings,
    absolute_uri,
    load_yaml_config,
)
from workflows.results import StageInputs, StageResult, numbers


@dataclass(frozen=True)
class PretrainResult:
    """What later stages need: where the model is and where it came from."""

    run_id: str
    model_uri: str  # runs:/<run_id>/model
    registered_name: str | None
    version: str | None
    dataset_fingerprint: str
    metrics: dict[str, float]
    offline: str | None = None  # the tracking server was away: what to `vitflow upload` (model_uri is local)


def load_config(path: str | Path) -> PretrainConfig:
    return load_yaml_config(path, PretrainConfig)


def run_stage(section: PretrainSettings, inputs: StageInputs) -> StageResult:
    """The workflow's pre-training stage: its spec section, run under the runner's name and storage."""
    config = PretrainConfig.model_validate({
        **section.model_dump(exclude={"dataset"}), "tracking": inputs.tracking.model_dump(), "name": inputs.name,
        "dataset": inputs.dataset.dataset_uri, "storage_path": inputs.storage_path})
    result = run_pretrain(config, parent_run_id=inputs.parent_run_id)
    if result.offline:
        raise tracking.TrackingUnavailable(
            f"pre-training finished but MLflow at {inputs.tracking.uri} is unreachable: upload its model with "
            f"`vitflow upload {result.offline}`, then run the workflow again")
    model_uri = f"models:/{result.registered_name}/{result.version}" if result.version else result.model_uri
    return StageResult(stage="pretrain", run_id=result.run_id, fingerprint=inputs.fingerprint, model_uri=model_uri,
                       dataset_fingerprint=inputs.dataset.dataset_fingerprint, metrics=numbers(result.metrics))


def run_pretrain(config: PretrainConfig, *, parent_run_id: str | None = None, console=None) -> PretrainResult:
    """Pre-train on Ray Train; log and register the model. Resumes an interrupted run of the same name."""

    index = read_dataset_index(config.dataset)
    # A dataset that cannot train a classifier fails here, naming it, before MLflow or Ray are touched.
    check_dataset(index, train_split=config.train_split, eval_splits=[config.val_split])
    model_config = config.model.build(num_classes=index.num_classes)
    tracking_uri = config.tracking.uri or tracking.default_tracking_uri()
    run_id = tracking.find_run(tracking_uri, config.tracking.experiment, {tag.RUN_NAME: config.name, tag.STAGE: "pretrain"})
    finished = tracking.finished_model(tracking_uri, run_id, config.register_as) if run_id else None
    if finished is not None:  # this run name already completed: nothing to redo, nothing to register twice
        model_uri, version, metrics = finished
        return PretrainResult(run_id=run_id, model_uri=model_uri, registered_name=config.register_as,
                              version=version, dataset_fingerprint=index.fingerprint, metrics=metrics)
    train_config, teacher = _pinned_teacher(config, tracking_uri, run_id, index.class_names)
    if run_id is None:
        run_id = tracking.start_run(
            tracking_uri, config.tracking.experiment, config.name, parent_run_id=parent_run_id,
            tags={tag.RUN_NAME: config.name, tag.STAGE: "pretrain", tag.DATASET_FINGERPRINT: index.fingerprint,
                  **system_tags()},
        )
        tracking.log_params(tracking_uri, run_id, {
            "model": model_config.to_dict(), "data": config.data.to_dict(), "train": train_config.to_dict(),
            "resources": config.resources.model_dump(), "dataset": config.dataset, "recipe": config.recipe or "none",
            "gflops_per_image": round(gflops(model_config), 4),
        })
        tracking.log_dataset(tracking_uri, run_id, config.dataset, name=Path(config.dataset).name,
                             digest=index.fingerprint, context="training")
    else:
        tracking.reopen_run(tracking_uri, run_id)  # a rerun continues the same MLflow run

    storage = absolute_uri(config.storage_path)
    spec = WorkerSpec(
        model=model_config,
        data=config.data,
        train=train_config,
        teacher=teacher,
        dataset=absolute_uri(config.dataset),
        train_split=config.train_split,
        val_split=config.val_split,
        class_names=tuple(index.class_names),
        tracking_uri=tracking_uri,
        run_id=run_id,
        offline_dir=offline_dir(storage, config.name),
        run_storage=f"{storage.rstrip('/')}/{config.name}",
        fail_at_step=config.fail_at_step,
        fault_marker=f"{Path(config.storage_path).resolve()}/{config.name}.fault-injected" if config.fail_at_step else None,
    )
    trainer = torch_trainer(spec, config.resources, name=config.name, storage_path=storage,
                            max_failures=config.max_failures, checkpoints_to_keep=config.checkpoints_to_keep)
    try:
        result = trainer.fit()
    except Exception:
        tracking.end_run(tracking_uri, run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"pre-training run {config.name!r} ended without a checkpoint")
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}  # the final report's
    weights = better_weights(metrics)  # the trained weights, or their EMA where it validates better
    model = _final_model(result.checkpoint, weights)
    tags = {
        "weights": weights,
        "variant": model_config.variant or "custom",
        "image_size": model_config.image_size[0],
        "dataset_fingerprint": index.fingerprint,
        "steps": int(metrics.get("step", config.train.total_steps)),  # with train.time_budget_s: as taken
        **({"teacher_model": train_config.distill.teacher} if train_config.distill else {}),
        **{f"final.{k}": round(v, 5) for k, v in metrics.items() if k.startswith("val/")},
    }
    offline = Path(spec.offline_dir)
    try:
        if not tracking.wait_reachable(tracking_uri, config.tracking.offline_after_s):
            raise tracking.TrackingUnavailable(f"no answer for {config.tracking.offline_after_s:.0f} s")
        if (offline / tracking.OFFLINE_METRICS).is_file():  # metrics training could not send: send them now
            for spilled_run, spilled in tracking.read_spilled_metrics(offline / tracking.OFFLINE_METRICS).items():
                tracking.send_metrics(tracking_uri, spilled_run, spilled)
            (offline / tracking.OFFLINE_METRICS).unlink()
        tracking.set_tags(tracking_uri, run_id, {tag.WEIGHTS: weights})
        logged = tracking.log_vit_model(tracking_uri, run_id, model, list(index.class_names),
                                        preprocessing=tracking.preprocessing_of(config.data))
        tracking.log_model_figures(tracking_uri, run_id, model, config.dataset, config.val_split, config.data)
        version = None
        if config.register_as:
            version = tracking.register_model(tracking_uri, logged.model_uri, config.register_as, tags, run_id)
        tracking.end_run(tracking_uri, run_id)
    except Exception as error:
        if not tracking.is_unreachable(error, tracking_uri):
            raise
        # Training is done and must not be lost to a tracking outage: keep the model for `vitflow upload`.
        bundle = tracking.save_offline(offline, tracking_uri=tracking_uri, run_id=run_id, model=model,
                                       class_names=list(index.class_names), preprocessing=tracking.preprocessing_of(config.data),
                                       register_as=config.register_as, tags=tags, stage="pretrain")
        print(f"MLflow at {tracking_uri} is unreachable ({error}). Pre-training finished; its checkpoints are in "
              f"{storage}/{config.name} and the model and unsent metrics in {bundle}. When the server is back, "
              f"upload them with: vitflow upload {bundle}", flush=True)
        return PretrainResult(run_id=run_id, model_uri=str(bundle / "model"), registered_name=config.register_as,
                              version=None, dataset_fingerprint=index.fingerprint, metrics=metrics,
                              offline=str(bundle))
    return PretrainResult(run_id=run_id, model_uri=logged.model_uri, registered_name=config.register_as,
                          version=version, dataset_fingerprint=index.fingerprint, metrics=metrics)


def _pinned_teacher(config: PretrainConfig, tracking_uri: str, run_id: str | None, class_names):
    """``config.train`` with its distillation teacher checked and pinned to a version, and the teacher's
    weights; a rerun of a started run keeps the teacher it started with (its params), wherever the alias
    points now."""
    if config.train.distill is None:
        return config.train, None
    if run_id is not None:
        started_with = tracking.run_params(tracking_uri, run_id).get("train.distill.teacher")
        if started_with:
            config = config.model_copy(update={"train": replace(
                config.train, distill=replace(config.train.distill, teacher=started_with))})
    return pin_teacher(tracking_uri, config.train, class_names, key="train.distill.teacher")


def _final_model(checkpoint, weights: str):
    with checkpoint.as_directory() as folder:
        return model_from_checkpoint(folder, weights=weights)


def offline_dir(storage: str, name: str) -> str:
    """Where a run keeps what the tracking server could not take (see ``tracking.save_offline``): beside
    its checkpoints when storage is a local path, else in this machine's temp folder."""
    if "://" in storage:
        return str(Path(tempfile.gettempdir()) / "vitflow-offline" / name)
    return str(Path(storage) / name / "mlflow-offline")
