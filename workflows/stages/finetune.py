"""The fine-tuning stage: a Ray Tune search over resolution and learning rate, each trial a training run
that starts from the pre-trained model (paper Section 3.2: zero-initialised head, position embeddings
interpolated in 2D to the new grid, SGD with momentum).

A trial of one worker (``resources.num_workers: 1``, the usual fine-tuning search) trains in the Tune
trial's own process, which Tune reuses for the next trial: nothing is started per trial. A trial of several
workers is a Ray Train run (Train V2 + Tune: the trainable builds and fits a ``TorchTrainer`` whose workers
report through ``TuneReportCallback``); its function holds no CPU (it would starve its own workers on a
small machine): it asks for the custom resource :data:`TRIAL_DRIVER_RESOURCE` instead, which vitflow gives
the local Ray it starts (a cluster declares it on its head node, see ``cluster.yaml``).

MLflow: a run for the search (nested under the workflow's run when given) and a child run per trial;
the best trial's model is logged, registered as ``vit-finetuned``, and given the alias ``champion`` when it
beats the current champion on the same test split.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vit import ViTConfig, gflops
from vit.data import DataConfig, check_dataset, read_dataset_index
from vit.ema import EMA_PREFIX, better_weights
from vit.finetune import FinetuneConfig
from vit.loop import TrainConfig
from workflows import tags as tag
from workflows import tracking
from workflows.compute.local_ray import TRIAL_DRIVER_RESOURCE, embedded_ray
from workflows.compute.training import (
    PretrainedStart,
    TeacherWeights,
    WorkerSpec,
    newest_persisted_checkpoint,
    persisted_checkpoints,
    pin_teacher,
    ray_storage,
    storage_uri,
    torch_trainer,
    train_in_trial,
)
from workflows.configs import (
    METRIC,
    MODES,
    FinetuneSearchConfig,
    FinetuneSettings,
    Resources,
    absolute_uri,
    load_yaml_config,
)
from workflows.results import StageInputs, StageResult

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class FinetuneResult:
    search_run_id: str
    best_run_id: str
    model_uri: str
    registered_name: str | None
    version: str | None
    champion: bool
    test_top1: float
    results_table: str  # artifact URI of the trials table (Parquet)
    best_image_size: int = 0
    best_lr: float = math.nan
    best_val_top1: float = math.nan
    gflops: float = math.nan  # the best model's forward GFLOPs per image


def load_config(path: str | Path) -> FinetuneSearchConfig:
    return load_yaml_config(path, FinetuneSearchConfig)


def trial_configs(config: FinetuneSearchConfig, params: dict[str, Any], model: ViTConfig, num_classes: int) -> dict[str, Any]:
    """The plain-dict configuration a trial trains with: the stage's, with the trial's parameters applied.
    The section holds no value these overwrite (see SEARCH_OWNED): each comes from the search alone."""
    sections = {
        "data": config.data.to_dict(),
        "train": config.train.to_dict(),  # its optim is the section's (FinetuneSettings._consistent)
        "finetune": {"mode": config.mode},
    }
    # search.lr's draw first: a choice of optim.lr (a grid of values, e.g. a divergence drill) replaces it.
    for name, value in sorted(params.items(), key=lambda item: item[0] != "lr"):
        if name == "image_size":
            sections["data"]["image_size"] = value
            sections["finetune"]["image_size"] = value
        elif name == "lr":
            sections["train"]["optim"]["lr"] = value
        elif name == "mode":
            sections["finetune"]["mode"] = value
        else:
            section, _, key = name.partition(".")
            target = sections["train"]["optim"] if section == "optim" else sections[section]
            target[key] = value
    sections["finetune"]["optim"] = sections["train"]["optim"]  # the recipe's record of what trained
    # Validate once more with the trial's values: a bad combination fails the trial with a clear message.
    DataConfig.from_dict(sections["data"])
    TrainConfig.from_dict(sections["train"])
    finetune = FinetuneConfig.from_dict(sections["finetune"])
    target = model.replace(image_size=finetune.image_size, num_classes=num_classes)
    sections["model"] = target.to_dict()
    return sections


def run_stage(section: FinetuneSettings, inputs: StageInputs) -> StageResult:
    """The workflow's fine-tuning stage: the search of its spec section from the model it is given."""
    config = FinetuneSearchConfig.model_validate({
        **section.model_dump(exclude={"dataset", "pretrained"}), "tracking": inputs.tracking.model_dump(),
        "name": inputs.name, "dataset": inputs.dataset.dataset_uri, "pretrained": inputs.model,
        "storage_path": inputs.storage_path})
    result = run_finetune(config, parent_run_id=inputs.parent_run_id, callbacks=inputs.callbacks)
    model_uri = f"models:/{result.registered_name}/{result.version}" if result.version else result.model_uri
    return StageResult(stage="finetune", run_id=result.search_run_id, fingerprint=inputs.fingerprint, model_uri=model_uri,
                       dataset_fingerprint=inputs.dataset.dataset_fingerprint,
                       metrics={"test/top1": result.test_top1, "best/image_size": result.best_image_size,
                                "best/lr": result.best_lr, "best/val_top1": result.best_val_top1,
                                "best/gflops": result.gflops})


TRANSFER_COLUMNS = ("task", "dataset", "model", "image_size", "lr", "val_top1", "test_top1", "gflops")


def transfer_rows(spec, results: dict[str, StageResult]) -> list[dict[str, Any]]:
    """One row per downstream task of ``spec`` (``finetune.tasks``), from its stages' results: the best
    trial's resolution and lr, validation top-1, test top-1 (its evaluate stage's, else the search's own
    test score), GFLOPs per image and the registered model."""
    rows = []
    for stage, section in spec.finetune_stages().items():
        task = stage.split(":", 1)[-1]
        found = results[stage]
        metrics = found.metrics
        evaluated = results.get(stage.replace("finetune", "evaluate", 1))
        split = spec.evaluate.split if spec.evaluate is not None else section.test_split
        test = evaluated.metrics.get(f"{split}/top1") if evaluated is not None else metrics.get("test/top1")
        rows.append({
            "task": task, "dataset": section.dataset, "model": found.model_uri,
            "image_size": int(metrics["best/image_size"]) if "best/image_size" in metrics else None,
            "lr": metrics.get("best/lr"), "val_top1": metrics.get("best/val_top1"),
            "test_top1": test, "gflops": metrics.get("best/gflops"),
        })
    return rows


def write_transfer_table(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """The transfer table as ``transfer_table.parquet``, ``transfer_table.md`` and ``transfer_table.png``
    (test top-1 per task, annotated with the resolution and GFLOPs it was reached at)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "transfer_table.parquet"
    pq.write_table(pa.Table.from_pylist([{k: row[k] for k in TRANSFER_COLUMNS} for row in rows]), table)

    def shown(value, fmt: str) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = ["| task | dataset | resolution | lr | val top-1 | test top-1 | GFLOPs/image | model |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['dataset']} | {shown(r['image_size'], 'd')} | {shown(r['lr'], '.3g')} | "
              f"{shown(r['val_top1'] * 100 if r['val_top1'] is not None else None, '.1f')} | "
              f"{shown(r['test_top1'] * 100 if r['test_top1'] is not None else None, '.1f')} | "
              f"{shown(r['gflops'], '.3f')} | {r['model'] or '-'} |" for r in rows]
    markdown = folder / "transfer_table.md"
    markdown.write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(2.4 + 1.3 * len(rows), 3.6))
    scores = [None if r["test_top1"] is None or math.isnan(r["test_top1"]) else 100 * r["test_top1"] for r in rows]
    bars = ax.bar([r["task"] for r in rows], [score or 0.0 for score in scores], color="tab:blue")
    for bar, row, score in zip(bars, rows, scores):
        ax.annotate(f"{'no test score' if score is None else f'{score:.1f}%'}\n"
                    f"{shown(row['image_size'], 'd')} px, {shown(row['gflops'], '.2f')} GFLOPs",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set(ylabel="test top-1 (%)", ylim=(0, 110))
    ax.set_title("transfer from one pre-trained model", fontsize=10)
    fig.tight_layout()
    png = folder / "transfer_table.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [table, markdown, png]


def run_finetune(config: FinetuneSearchConfig, *, parent_run_id: str | None = None,
                 callbacks: Sequence[Any] = ()) -> FinetuneResult:

    index = read_dataset_index(config.dataset)
    # A dataset that cannot train a classifier fails here, naming it, before MLflow or Ray are touched.
    check_dataset(index, train_split=config.train_split, eval_splits=[config.val_split, config.test_split])
    tracking_uri = config.tracking.uri or tracking.default_tracking_uri()
    pretrained = tracking.load_plain_model(tracking_uri, config.pretrained)
    for size in config.search.image_size:  # the resolutions must fit the pre-trained patch size
        pretrained.config.replace(image_size=size, num_classes=index.num_classes)

    tags = {tag.RUN_NAME: config.name, tag.STAGE: "finetune"}
    search_run_id = tracking.find_run(tracking_uri, config.tracking.experiment, tags)
    if config.train.distill is not None:
        # Every trial distils from the same teacher: pinned once (a rerun: the one the search started with).
        started_with = tracking.run_params(tracking_uri, search_run_id).get("train.distill.teacher") if search_run_id else None
        train = replace(config.train, distill=replace(config.train.distill, teacher=started_with)) if started_with else config.train
        train, teacher = pin_teacher(tracking_uri, train, index.class_names, key="train.distill.teacher")
        config = config.model_copy(update={"train": train})
    else:
        teacher = None
    if search_run_id is None:
        search_run_id = tracking.start_run(
            tracking_uri, config.tracking.experiment, config.name, parent_run_id=parent_run_id,
            tags={**tags, tag.PRETRAINED: config.pretrained, tag.DATASET_FINGERPRINT: index.fingerprint},
        )
        tracking.log_params(tracking_uri, search_run_id, {
            "pretrained": config.pretrained, "dataset": config.dataset, "search": config.search.model_dump(),
            **config.model_dump(include={"mode", "optim", "data", "train"}),
        })
        tracking.log_dataset(tracking_uri, search_run_id, config.dataset, name=Path(config.dataset).name,
                             digest=index.fingerprint, context="fine-tuning")
    else:
        tracking.reopen_run(tracking_uri, search_run_id)

    # This search's own Ray unless one is running (a workflow's, a cluster's): see workflows.compute.local_ray.
    with embedded_ray(config.storage_path, resources={TRIAL_DRIVER_RESOURCE: config.search.max_concurrent_trials}):
        try:
            grid = _search(config, pretrained, teacher, index, tracking_uri, search_run_id, callbacks)
            result = _conclude(config, grid, pretrained, index, tracking_uri, search_run_id)
        except Exception:
            tracking.end_run(tracking_uri, search_run_id, status="FAILED")
            raise
    tracking.end_run(tracking_uri, search_run_id)
    return result


def _search(config: FinetuneSearchConfig, pretrained, teacher: TeacherWeights | None, index, tracking_uri: str,
            search_run_id: str, callbacks: Sequence[Any] = ()):
    import ray
    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.schedulers import ASHAScheduler

    space: dict[str, Any] = {
        "image_size": tune.choice(config.search.image_size),
        "lr": tune.loguniform(config.search.lr.min, config.search.lr.max),
        **{name: tune.choice(values) for name, values in config.search.choices.items()},
    }
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Random search, reproducible from search.seed, with the concurrency limit on the generator itself
    # (Tune ignores TuneConfig.max_concurrent_trials for a generator; it applies it to Optuna below).
    search_alg = BasicVariantGenerator(random_state=config.search.seed, max_concurrent=config.search.max_concurrent_trials)
    if config.search.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as error:
            raise ValueError(f"search.search_alg 'optuna' needs the optuna package: {error}") from None
        search_alg = OptunaSearch(metric=config.search.metric, mode=MODES[config.search.metric], seed=config.search.seed)
    scheduler = None
    if config.search.scheduler:
        scheduler = ASHAScheduler(time_attr="step", max_t=config.train.total_steps,
                                  grace_period=config.search.scheduler.grace_period,
                                  reduction_factor=config.search.scheduler.reduction_factor)
    shared = {
        "config": config.model_dump(mode="json"),
        "pretrained": {"state_dict": ray.put(pretrained.state_dict), "config": pretrained.config.to_dict(),
                       "uri": config.pretrained},
        "teacher": None if teacher is None else {"state_dict": ray.put(teacher.state_dict),
                                                 "config": teacher.config.to_dict(), "uri": teacher.uri},
        "num_classes": index.num_classes,
        "class_names": list(index.class_names),
        "tracking_uri": tracking_uri,
        "search_run_id": search_run_id,
    }
    trainable = tune.with_resources(tune.with_parameters(run_trial, shared=shared), _trial_resources(config.resources))
    # Tune registers a trainable under its name in the Ray job's registry, where its trials' processes look
    # it up: concurrent searches of one job (a workflow's downstream tasks) would take each other's under
    # the shared name "run_trial". The search's own (deterministic) name keeps it its own, and a restore
    # finds the name it saved.
    trainable.__name__ = "run_trial_" + re.sub(r"[^A-Za-z0-9_.-]", "_", config.name)
    storage = absolute_uri(config.storage_path)
    path = f"{storage.rstrip('/')}/{config.name}"
    stored = ray_storage(path)
    if Tuner.can_restore(stored["storage_path"], storage_filesystem=stored.get("storage_filesystem")):
        # An interrupted search resumes: finished trials are kept, unfinished ones continue from their
        # last checkpoint; trials that failed (after their retries) stay failed.
        log.info("resuming search %s from %s", config.name, path)
        tuner = Tuner.restore(stored["storage_path"], trainable=trainable, resume_unfinished=True, resume_errored=False,
                              storage_filesystem=stored.get("storage_filesystem"))
        # A restored search gets the run config it saved, whose callbacks were pickled as no-ops (the console's
        # view holds a terminal, the relay a queue of a run gone): this run's own callbacks instead. Tune has
        # no public way to pass them to a restore (ray-project/ray#41364); an AttributeError here says Ray moved it.
        tuner._local_tuner.get_run_config().callbacks = list(callbacks)
    else:
        tuner = Tuner(
            trainable,
            param_space=space,
            tune_config=TuneConfig(metric=config.search.metric, mode=MODES[config.search.metric],
                                   num_samples=config.search.num_samples,
                                   max_concurrent_trials=(config.search.max_concurrent_trials
                                                          if config.search.search_alg == "optuna" else None),
                                   scheduler=scheduler, search_alg=search_alg,
                                   # in-process trials: the next trial reuses a finished one's process
                                   reuse_actors=in_process_trials(config.resources)),
            run_config=RunConfig(name=config.name, **ray_storage(storage),
                                 failure_config=FailureConfig(max_failures=config.search.max_failures),
                                 callbacks=list(callbacks)),
        )
    return tuner.fit()


def _trial_resources(resources: Resources) -> dict[str, float]:
    """What a trial's own process holds: the worker's CPUs (and GPU) when it trains itself, else only a
    trial-driver slot (holding a CPU would starve its own workers on a small machine)."""
    import ray

    if in_process_trials(resources):
        return resources.per_worker()
    if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE, 0) >= 1:
        return {TRIAL_DRIVER_RESOURCE: 1}
    log.warning("the Ray cluster declares no %r resource: trial drivers take 0.01 CPU, which may limit "
                "concurrency (start Ray with --resources '{\"%s\": N}')", TRIAL_DRIVER_RESOURCE, TRIAL_DRIVER_RESOURCE)
    return {"CPU": 0.01}


def run_trial(params: dict[str, Any], shared: dict[str, Any]) -> None:
    """One trial (runs in a Tune trial actor): a child MLflow run, and training in this process (one
    worker) or a ``TorchTrainer`` fit whose workers report to Tune through ``TuneReportCallback``."""
    from ray import tune

    config = FinetuneSearchConfig.model_validate(shared["config"])
    pretrained = ViTConfig.from_dict(shared["pretrained"]["config"])
    trial_id = tune.get_context().get_trial_id()
    uri = shared["tracking_uri"]
    tags = {tag.STAGE: "finetune-trial", tag.TRIAL_ID: trial_id, tag.SEARCH_RUN_ID: shared["search_run_id"]}
    run_id = tracking.find_run(uri, config.tracking.experiment, tags)
    trial_storage = f"{absolute_uri(config.storage_path).rstrip('/')}/{config.name}-trials/{config.name}-{trial_id}"
    if run_id is not None:
        # It finished before the search's driver died (Tune had not saved that yet; or its training
        # ended and the driver died before the run was closed): report what it reached, with its final
        # checkpoint, instead of training it again (a resumed fit at its last step has nothing to report).
        finished = _finished_trial_result(uri, run_id, trial_storage, config.train.total_steps)
        if finished is not None:
            if tracking.run_status(uri, run_id) != "FINISHED":
                tracking.end_run(uri, run_id)
            tune.report(finished)
            return
    fresh = run_id is None
    if fresh:  # a restored (or retried) trial re-enters: keep one MLflow run per trial
        run_id = tracking.start_run(uri, config.tracking.experiment, f"{config.name}-{trial_id}",
                                    parent_run_id=shared["search_run_id"], tags=tags)
    else:
        tracking.reopen_run(uri, run_id)

    def failed(error: BaseException) -> None:  # every trial is on record, a failed one with its reason
        tracking.set_tags(uri, run_id, {tag.ERROR: f"{type(error).__name__}: {error}"[:5000]})
        tracking.end_run(uri, run_id, status="FAILED")

    try:
        sections = trial_configs(config, params, pretrained, shared["num_classes"])
    except ValueError as error:  # a combination of the search space the configuration rejects
        if fresh:
            tracking.log_params(uri, run_id, dict(params))
        failed(error)
        raise ValueError(f"trial {trial_id} {dict(params)}: {error}") from None
    if fresh:
        target = ViTConfig.from_dict(sections["model"])
        tracking.log_params(uri, run_id, {**{k: v for k, v in params.items()}, "model": sections["model"],
                                          "data": sections["data"], "train": sections["train"],
                                          "finetune": sections["finetune"], "gflops_per_image": round(gflops(target), 4),
                                          "pretrained": shared["pretrained"]["uri"]})
    resources = config.resources
    spec = WorkerSpec(
        model=ViTConfig.from_dict(sections["model"]),
        data=DataConfig.from_dict(sections["data"]),
        train=TrainConfig.from_dict(sections["train"]),
        dataset=absolute_uri(config.dataset),
        train_split=config.train_split,
        val_split=config.val_split,
        class_names=tuple(shared["class_names"]),
        tracking_uri=uri,
        run_id=run_id,
        pretrained=PretrainedStart(state_dict=shared["pretrained"]["state_dict"], config=pretrained,
                                   uri=shared["pretrained"]["uri"], mode=sections["finetune"]["mode"]),  # a choice may set mode
        teacher=None if shared["teacher"] is None else TeacherWeights(
            state_dict=shared["teacher"]["state_dict"], config=ViTConfig.from_dict(shared["teacher"]["config"]),
            uri=shared["teacher"]["uri"]),
        report_validation_only=True,  # every Tune result carries the search's metric (ASHA's)
        close_run_at_end=True,  # FINISHED before the last report, at which ASHA may stop the trial
        run_storage=trial_storage,
    )
    try:
        if in_process_trials(resources):
            train_in_trial(spec, cpus=resources.cpus_per_worker, use_gpu=resources.use_gpu)
        else:
            _fit_worker_group(config, trial_id, spec)
    except Exception as error:  # e.g. a non-finite loss (vit.loop stops at once) or a worker that died
        failed(error)
        raise
    if tracking.run_status(uri, run_id) != "FINISHED":  # rank 0 closes it before the last report
        tracking.end_run(uri, run_id)


def in_process_trials(resources: Resources) -> bool:
    """A trial of one worker trains in the Tune trial's own (reused) process: a Ray Train worker group
    would add a controller and a worker process per trial and nothing a single worker needs (Tune
    retries failed trials itself). Trials of several workers train as DDP on a Ray Train worker group."""
    return resources.num_workers == 1


def _fit_worker_group(config: FinetuneSearchConfig, trial_id: str, spec: WorkerSpec) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    torch_trainer(spec, config.resources, name=f"{config.name}-{trial_id}",
                  storage_path=f"{absolute_uri(config.storage_path).rstrip('/')}/{config.name}-trials",
                  max_failures=0,  # Tune retries the whole trial
                  checkpoints_to_keep=1, callbacks=[TuneReportCallback()]).fit()


def _finished_trial_result(uri: str, run_id: str, trial_storage: str, total_steps: int) -> dict[str, Any] | None:
    """A finished trial's last validation metrics (from MLflow) and final checkpoint (from its Ray Train
    storage), as the Tune result its run would have reported; None when either is missing.

    Finished means it trained to ``total_steps``: a checkpoint of the last step is persisted and its last
    validation is on record (rank 0 flushes metrics, and closes the run, before reporting the checkpoint
    that goes with them; so a FINISHED run whose last checkpoint is not persisted yet is not finished).
    """
    metrics = tracking.run_metrics(uri, run_id)
    if METRIC not in metrics or "train/loss" not in metrics:
        return None
    _, checkpoints = persisted_checkpoints(trial_storage)
    if not checkpoints:
        return None
    steps = tracking.last_step(uri, run_id, METRIC)
    if steps < total_steps:
        return None
    with tempfile.TemporaryDirectory(prefix="vitflow-trial-") as scratch:  # remote storage: a copy to read
        if newest_persisted_checkpoint(trial_storage, than_step=total_steps - 1, scratch=scratch) is None:
            return None
    return {**{k: v for k, v in metrics.items() if k.startswith(("val/", "train/"))}, "step": steps,
            "checkpoint_path": storage_uri(trial_storage, checkpoints[-1])}


# --- after the search -------------------------------------------------------------------------


def trials_table(grid) -> list[dict[str, Any]]:
    """One row per trial: its parameters, accuracy and compute (resolution, GFLOPs/image, img/s, time)."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        params = dict(result.config)
        image_size = int(params["image_size"])
        metrics = result.metrics or {}
        throughput = history["train/images_per_sec"].dropna().tolist() if history is not None and "train/images_per_sec" in history else []
        checkpoints = history["checkpoint_path"].dropna().tolist() if history is not None and "checkpoint_path" in history else []
        rows.append({
            "trial_id": metrics.get("trial_id", Path(result.path).name),
            "image_size": image_size,
            "lr": float(params["lr"]),
            **{k: v for k, v in params.items() if k not in ("image_size", "lr")},
            "val_top1": float(metrics.get(METRIC, math.nan)),
            "val_top5": float(metrics.get("val/top5", math.nan)),
            "val_loss": float(metrics.get("val/loss", math.nan)),
            "val_ema_top1": float(metrics.get(f"{EMA_PREFIX}top1", math.nan)),  # nan: the trial kept no EMA
            "weights": better_weights(metrics),  # the trial's better weights on validation: raw or ema
            "steps": int(metrics.get("step", 0)),
            "status": "error" if result.error else "finished",
            "images_per_sec": statistics.median(throughput) if throughput else math.nan,
            "wall_time_s": float(metrics.get("time_total_s", math.nan)),
            "checkpoint_path": checkpoints[-1] if checkpoints else None,
        })
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point beats on both: cheaper-or-equal and better."""
    front = []
    for i, (cost, accuracy) in enumerate(points):
        dominated = any(c <= cost and a >= accuracy and (c, a) != (cost, accuracy) for c, a in points)
        if not dominated and not math.isnan(accuracy):
            front.append(i)
    return front


def write_tradeoff_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Validation top-1 against GFLOPs per image, one colour per resolution, the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted({row["image_size"] for row in rows})
    colours = plt.get_cmap("viridis")(range(0, 256, max(1, 256 // max(len(sizes), 1))))
    for colour, size in zip(colours, sizes):
        chosen = [row for row in rows if row["image_size"] == size]
        ax.scatter([r["gflops"] for r in chosen], [100 * r["val_top1"] for r in chosen], color=colour,
                   label=f"{size} px", s=40, edgecolor="k", linewidth=0.5)
    front = sorted((rows[i]["gflops"], 100 * rows[i]["val_top1"]) for i in pareto_front([(r["gflops"], r["val_top1"]) for r in rows]))
    if front:
        ax.plot(*zip(*front), "r--", label="Pareto front", linewidth=1)
    ax.set(xlabel="GFLOPs per image (forward)", ylabel="validation top-1 (%)", title="fine-tuning: accuracy vs compute")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _conclude(config: FinetuneSearchConfig, grid, pretrained, index, tracking_uri: str, search_run_id: str) -> FinetuneResult:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.train import Checkpoint

    from vit.checkpoint import model_from_checkpoint
    from vit.data import eval_loader
    from vit.loop import evaluate

    rows = trials_table(grid)
    for row in rows:
        # A trial Tune stopped (ASHA at a rung, or at max_t on its last report) ends inside its report
        # call, before it can close its MLflow run: close it here, by what it reached.
        run_id = tracking.find_run(tracking_uri, config.tracking.experiment,
                                   {tag.TRIAL_ID: row["trial_id"], tag.SEARCH_RUN_ID: search_run_id})
        if not run_id or tracking.run_status(tracking_uri, run_id) != "RUNNING":
            continue
        if row["status"] == "error":
            tracking.end_run(tracking_uri, run_id, status="FAILED")
        elif row["steps"] < config.train.total_steps:
            tracking.set_tags(tracking_uri, run_id, {tag.STOPPED_EARLY: "true"})
            tracking.end_run(tracking_uri, run_id, status="KILLED")
        else:
            tracking.end_run(tracking_uri, run_id)
    for row in rows:
        row["gflops"] = gflops(pretrained.config.replace(image_size=row["image_size"], num_classes=index.num_classes))
    finished = [row for row in rows if row["checkpoint_path"] and not math.isnan(row["val_top1"])]
    if not finished:
        errors = [str(result.error) for result in grid if result.error]
        raise RuntimeError(f"fine-tuning search {config.name!r}: no trial finished; errors: {errors[:3]}")
    # The best by the search's metric; among equals, the cheaper resolution.
    sign = 1.0 if MODES[config.search.metric] == "max" else -1.0
    column = config.search.metric.replace("/", "_")
    best = max(finished, key=lambda row: (sign * row[column], -row["gflops"]))
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "trials.parquet"
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items()} for row in rows]), table)
        figure = write_tradeoff_figure(rows, Path(tmp) / "accuracy_vs_gflops.png")
        tracking.log_artifacts(tracking_uri, search_run_id, [table, figure], "search")
    tracking.log_metrics(tracking_uri, search_run_id, {"best/val_top1": best["val_top1"], "trials": len(rows),
                                                       "trials_failed": sum(r["status"] == "error" for r in rows)})

    with Checkpoint(best["checkpoint_path"]).as_directory() as folder:
        model = model_from_checkpoint(folder, weights=best["weights"])
    data = DataConfig.from_dict({**config.data.to_dict(), "image_size": model.config.image_size[0]})
    test = evaluate(model, eval_loader(config.dataset, data, rank=0, world_size=1, split=config.test_split))
    best_run = tracking.find_run(tracking_uri, config.tracking.experiment,
                                 {tag.TRIAL_ID: best["trial_id"], tag.SEARCH_RUN_ID: search_run_id})
    best_run = best_run or search_run_id
    tracking.log_metrics(tracking_uri, best_run, {"test/top1": test["top1"], "test/top5": test["top5"]})
    tracking.set_tags(tracking_uri, best_run, {tag.WEIGHTS: best["weights"]})
    logged = tracking.log_vit_model(tracking_uri, best_run, model, list(index.class_names), preprocessing=tracking.preprocessing_of(data))
    tracking.log_model_figures(tracking_uri, best_run, model, config.dataset, config.val_split, data)
    version, champion = None, False
    if config.register_as:
        test_key = f"{index.fingerprint}:{config.test_split}"
        tags = {
            "pretrained_model": config.pretrained,
            "pretrained_version": _registry_version(tracking_uri, config.pretrained),
            "dataset_fingerprint": index.fingerprint,
            "search_run_id": search_run_id,
            "image_size": best["image_size"],
            "lr": f"{best['lr']:.4g}",
            "test_split": test_key,
            "test_top1": f"{test['top1']:.6f}",
            "weights": best["weights"],
            **({"teacher_model": config.train.distill.teacher} if config.train.distill else {}),
        }
        version = tracking.register_model(tracking_uri, logged.model_uri, config.register_as, tags, best_run)
        champion = tracking.promote_if_better(tracking_uri, config.register_as, version, config.champion_alias,
                                              test_key=test_key, score=test["top1"])
    return FinetuneResult(search_run_id=search_run_id, best_run_id=best_run, model_uri=logged.model_uri,
                          registered_name=config.register_as, version=version, champion=champion,
                          test_top1=test["top1"], results_table=f"runs:/{search_run_id}/search/trials.parquet",
                          best_image_size=best["image_size"], best_lr=best["lr"], best_val_top1=best["val_top1"],
                          gflops=best["gflops"])


def _registry_version(tracking_uri: str, model_uri: str) -> str:
    """The registered version a model URI points at (``models:/name@alias`` resolved), or ''."""
    return tracking.resolve_version(tracking_uri, model_uri) or ""

