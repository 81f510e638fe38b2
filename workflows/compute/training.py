"""The training function shared by pre-training and fine-tuning trials, and what it prints.

What a worker trains is a ``WorkerSpec``: typed and frozen, built by the stage on the driver and shipped to
every worker, so a missing or misspelt field fails where the stage builds it, not as a KeyError on a remote
worker. It runs plain ``vit.loop.fit``; the framework touch points are all here, behind a small ``WorkerSession``:
on a Ray Train worker (``train_worker``) rank and device come from Ray, DDP through
``ray.train.torch.prepare_model``, checkpoints and metrics through ``ray.train.report`` (which Tune's
``TuneReportCallback`` forwards to a search); in a single-worker Tune trial (``train_in_trial``) the trial's
own process trains, persists its checkpoints and reports to Tune. Rank 0's metrics go to MLflow.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from vit import ViTConfig
from vit.data import DataConfig
from vit.ema import EMA_PREFIX
from vit.loop import TrainConfig
from vit.precision import Hardware, SlowPrecisionWarning, probe, resolve_precision
from workflows import tracking


@dataclass(frozen=True)
class PretrainedStart:
    """Fine-tuning's starting point: the pre-trained weights (a Ray object reference when they travel
    through the object store to a remote trial) and the config they were trained with."""

    state_dict: Any  # dict[str, Tensor] or ray.ObjectRef to one
    config: ViTConfig
    uri: str  # where they came from (models:/..., runs:/..., a folder), for the record
    mode: str = "full"  # vit.finetune mode: "full" or "linear_probe"


@dataclass(frozen=True)
class TeacherWeights:
    """Distillation's frozen teacher, loaded once on the driver and shipped to every worker (a Ray object
    reference when it travels through the object store to a remote trial): workers need no access to
    where it came from."""

    state_dict: Any  # dict[str, Tensor] or ray.ObjectRef to one
    config: ViTConfig
    uri: str  # the pinned reference (models:/name/VERSION, runs:/..., a folder), for the record


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a training worker needs. Pre-training and each fine-tuning trial build one."""

    model: ViTConfig  # the model being trained (for fine-tuning: at the trial's resolution, the new head)
    data: DataConfig
    train: TrainConfig
    dataset: str  # the shard folder or URI (absolute: workers run elsewhere)
    class_names: tuple[str, ...]
    tracking_uri: str
    run_id: str  # the MLflow run rank 0 logs into
    train_split: str = "train"
    val_split: str = "val"
    run_storage: str | None = None  # where this run's checkpoints persist (resume looks there)
    pretrained: PretrainedStart | None = None  # fine-tuning: start from these weights (paper Section 3.2)
    teacher: TeacherWeights | None = None  # train.distill's teacher (pin_teacher)
    offline_dir: str | None = None  # where metrics MLflow could not take are spilled at the end
    report_validation_only: bool = False  # a Tune trial: Tune compares trials on validation metrics only
    close_run_at_end: bool = False  # a Tune trial: FINISHED before the last report (ASHA may stop it there)
    fail_at_step: int | None = None  # fault drill: rank 0 raises once at this step...
    fault_marker: str | None = None  # ...and marks here that it did

    def __post_init__(self) -> None:
        if self.fail_at_step is not None and self.fault_marker is None:
            raise ValueError("fail_at_step needs a fault_marker (the drill fires once)")
        if (self.train.distill is None) != (self.teacher is None):
            raise ValueError("train.distill and the teacher's weights come together (pin_teacher gives both)")


def system_tags() -> dict[str, str]:
    import torch

    tags = {
        "system.python": platform.python_version(),
        "system.platform": platform.platform(),
        "system.torch": torch.__version__,
        "system.cpu_count": str(os.cpu_count()),
        "system.cuda": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        tags["system.gpu"] = torch.cuda.get_device_name(0)
    return tags


@dataclass(frozen=True)
class WorkerSession:
    """What a training function needs from whoever runs it: a Ray Train worker group (``train_worker``) or a
    Tune trial's own process (``train_in_trial``). ``report`` takes the metrics and the local folder of a
    checkpoint ``fit`` just wrote (or None) and is responsible for persisting that checkpoint."""

    rank: int
    world_size: int
    device: Any  # torch.device
    registered_checkpoint: Callable[[Path], str | None]  # copy the runner's latest checkpoint into a folder
    report: Callable[[dict[str, float], str | None], None]
    prepare_model: Callable[[Any], Any] | None = None
    node: str = ""  # this worker's node, for its system metrics on multi-worker runs


def train_worker(config: dict[str, WorkerSpec]) -> None:
    """Runs on every Ray Train worker (``train_loop_config={"spec": WorkerSpec}``): rank and device from
    Ray, DDP through ``prepare_model``, checkpoints and metrics through ``ray.train.report`` (forwarded to
    Tune by ``TuneReportCallback`` in a search)."""
    import ray.train
    import ray.train.torch
    import torch

    _quiet_ray_train_reports()
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS from the worker's CPUs; make torch's intra-op pool match it.
        torch.set_num_threads(max(1, int(float(os.environ.get("OMP_NUM_THREADS", "1")))))

    def registered_checkpoint(folder: Path) -> str | None:
        checkpoint = ray.train.get_checkpoint()
        # A copy in this worker's own folder: Ray's default folder is shared by the workers of a node, and
        # a worker arriving after another's copy copies again over the files the first is reading.
        return None if checkpoint is None else checkpoint.to_directory(str(folder))

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        ray_checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ray_checkpoint)
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted by Ray to the run's storage

    rank = context.get_world_rank()
    _train(config["spec"], WorkerSession(rank=rank, world_size=context.get_world_size(), device=device,
                              registered_checkpoint=registered_checkpoint, report=report,
                              prepare_model=ray.train.torch.prepare_model,
                              node=f"rank{rank}-node{ray.get_runtime_context().get_node_id()[:8]}"))


def torch_trainer(spec: WorkerSpec, resources, *, name: str, storage_path: str, max_failures: int,
                  checkpoints_to_keep: int, callbacks=()):
    """The one Ray Train ``TorchTrainer`` vitflow builds: ``train_worker`` on ``resources.num_workers``
    DDP workers (each holding ``resources.per_worker()``), checkpoints persisted under
    ``storage_path/name`` (a rerun of the same name resumes there), ``max_failures`` worker-group restarts."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=resources.per_worker()),
        run_config=RunConfig(name=name, **ray_storage(storage_path), failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep), callbacks=list(callbacks)),
    )


def ray_storage(storage_path: str) -> dict[str, Any]:
    """Ray Train's and Tune's ``storage_path`` (and ``storage_filesystem``) arguments for a folder or a
    URI: an object store through ``pipeline.storage.patient_filesystem``, so checkpoints and Tune's state
    are persisted through a store that goes away for a while (pyarrow's own S3 client gives up after
    3 quick attempts) and a file appears there only once whole."""
    from pipeline.storage import is_uri, patient_filesystem

    if not is_uri(storage_path):
        return {"storage_path": storage_path}
    fs, path = patient_filesystem(storage_path)
    return {"storage_path": path, "storage_filesystem": fs}


def train_in_trial(spec: WorkerSpec, *, cpus: float, use_gpu: bool) -> None:
    """A single-worker Tune trial trained in the trial's own process: no Ray Train controller and worker
    group to start for it (on 2 cores those cost ~15 s a trial, most of a short trial's time). Metrics go
    to Tune through ``tune.report``; checkpoints are persisted by this function into ``spec.run_storage``
    (named and kept like Ray Train's: ``checkpoint_<time>``, the newest only), and Tune gets their path."""
    import torch
    from ray import tune

    device = torch.device("cuda" if use_gpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cpus)))

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            metrics = {**metrics, "checkpoint_path": persist_checkpoint(checkpoint_dir, spec.run_storage)}
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        tune.report(metrics)

    # A rerun of the trial (Tune's retry, or a restored search) resumes from its persisted checkpoints.
    _train(spec, WorkerSession(rank=0, world_size=1, device=device, registered_checkpoint=lambda folder: None,
                              report=report))


def _train(spec: WorkerSpec, session: WorkerSession) -> None:
    """Plain ``vit.loop.fit`` between the session's touch points; rank 0 also sends metrics to MLflow."""
    import torch

    from vit.data import eval_loader, train_loader
    from vit.loop import fit
    from vit.perf import peak_flops
    rank, world_size = session.rank, session.world_size
    data_config, train_config = spec.data, spec.train
    hardware = probe(session.device)
    with warnings.catch_warnings():  # fit warns about an emulated precision itself
        warnings.simplefilter("ignore", SlowPrecisionWarning)
        precision = resolve_precision(train_config.precision, hardware)
    if rank == 0:
        print(f"{world_size} worker(s) on {session.device}, {torch.get_num_threads()} torch threads each; "
              f"precision {precision} ({train_config.precision}; {hardware.describe()})", flush=True)
        _record_precision(spec.tracking_uri, spec.run_id, precision, hardware)
    peak = peak_flops(session.device, precision)  # perf/mfu's denominator: measured once per machine
    # CPU, memory (and GPU) of every worker's machine, named per worker when there are several.
    monitor = tracking.start_system_metrics(spec.tracking_uri, spec.run_id,
                                            node_id=session.node if world_size > 1 else None)
    model = initial_model(spec)
    train = train_loader(spec.dataset, data_config, rank=rank, world_size=world_size, split=spec.train_split)
    val = eval_loader(spec.dataset, data_config, rank=rank, world_size=world_size, split=spec.val_split)

    # This worker's folder: the checkpoints it writes, and the copies it resumes from (removed at the end).
    local_checkpoints = Path(tempfile.mkdtemp(prefix="vitflow-ckpt-"))
    resume_dir = session.registered_checkpoint(local_checkpoints / "reported")
    newer = newest_persisted_checkpoint(spec.run_storage, than_step=checkpoint_step(resume_dir),
                                        scratch=local_checkpoints)
    if newer is not None:
        if rank == 0:
            print(f"resuming from {newer}: persisted after the checkpoint the runner had registered", flush=True)
        resume_dir = newer
    buffer = tracking.MetricBuffer(spec.tracking_uri, spec.run_id) if rank == 0 else None
    if buffer is not None and resume_dir is None and spec.pretrained is not None:
        # The fine-tuning recipe's evidence: the head fit starts from is exactly zero (Section 3.2).
        buffer.log(0, {"init/head_abs_max": float(model.head.weight.abs().max()), "init/head_bias_abs_max": float(model.head.bias.abs().max())})
        buffer.flush_if_healthy()
    progress = Progress(train_config.total_steps, data_config.batch_size * world_size * train_config.grad_accum_steps)

    def report(step: int, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        if spec.fail_at_step and rank == 0 and step >= spec.fail_at_step and not os.path.exists(spec.fault_marker):
            Path(spec.fault_marker).touch()  # fire once: the replacement worker group runs on
            raise RuntimeError(f"fault drill: rank 0 fails at step {step}")
        if buffer is not None:
            buffer.log(step, metrics)
            if checkpoint_dir or any(key.startswith("val/") for key in metrics):
                # A search may stop this trial at any report: have what it measured on record first
                # (unless the tracking server is away: then the buffer keeps it and training goes on).
                buffer.flush_if_healthy()
            progress.print(step, metrics)
        validated = any(key.startswith("val/") for key in metrics)
        if spec.report_validation_only and not validated:
            return  # a Tune trial: Tune compares trials on validation metrics, MLflow has the rest
        if buffer is not None and spec.close_run_at_end and step >= train_config.total_steps:
            # A search's scheduler may stop the trial at its last report (ASHA does at max_t), and then
            # nothing after this line runs: close the trial's run first, with its metrics on record.
            _close_run(spec.tracking_uri, spec.run_id, buffer)
        session.report({**metrics, "step": step}, checkpoint_dir)

    metadata = {"class_names": list(spec.class_names), "data": spec.data.to_dict()}
    teacher = load_teacher(spec.teacher) if spec.teacher is not None else None
    try:
        fit(model, train, val, train_config, report=report, checkpoint_dir=local_checkpoints,
            resume_from=resume_dir, device=session.device, rank=rank,
            prepare_model=session.prepare_model, metadata=metadata, peak_flops=peak, teacher=teacher)
    finally:
        away = buffer is not None and not buffer.healthy  # rank 0 knows whether the server is there
        if monitor is not None:
            monitor.finish(last_sample=not away)
        if buffer is not None:
            spill = Path(spec.offline_dir) / tracking.OFFLINE_METRICS if spec.offline_dir else None
            # With a server known to be away and a file to spill to, spill at once: the stage waits for the
            # server itself (tracking.offline_after_s) and sends what was spilled. A trial has no such file:
            # it waits up to 30 s for the server rather than lose its metrics.
            buffer.close(timeout_s=0.0 if away and spill is not None else 30.0, spill_path=spill)
        shutil.rmtree(local_checkpoints, ignore_errors=True)


def _close_run(tracking_uri: str, run_id: str, buffer) -> None:
    """Mark a trial's run FINISHED once its training is complete; during a tracking outage the run stays
    open (the search's conclusion closes it) and training goes on."""
    if not buffer.flush_if_healthy():
        return
    try:
        tracking.end_run(tracking_uri, run_id)
    except Exception as error:
        if not tracking.is_unreachable(error, tracking_uri):
            raise


def _record_precision(tracking_uri: str, run_id: str, precision: str, hardware: Hardware) -> None:
    """The precision the run trains with, resolved on this worker's device, as an MLflow param (and the
    hardware it was resolved for as tags). A tracking outage does not stop training for it."""
    try:
        tracking.log_params(tracking_uri, run_id, {"precision": precision})
        tracking.set_tags(tracking_uri, run_id, {"system.device_capability": hardware.capability,
                                                 "system.native_bf16": str(hardware.native_bf16)})
    except Exception as error:
        if not tracking.is_unreachable(error, tracking_uri):
            raise
        print(f"precision {precision} not recorded: MLflow at {tracking_uri} is unreachable ({error})", flush=True)


def persist_checkpoint(folder: str, run_storage: str, keep: int = 1) -> str:
    """Copy a local checkpoint folder into ``run_storage`` (a path or URI) as ``checkpoint_<time>``, named
    like Ray Train's so that :func:`persisted_checkpoints` lists both; keep the newest ``keep``. Returns the
    copy's path (a URI for remote storage)."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(run_storage)
    name = "checkpoint_" + datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
    target = f"{root.rstrip('/')}/{name}"
    fs.create_dir(target, recursive=True)
    pafs.copy_files(folder, target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    _, names = persisted_checkpoints(run_storage)
    for old in names[:-keep]:
        fs.delete_dir(old)
    return storage_uri(run_storage, target)


def storage_uri(run_storage: str, path: str) -> str:
    """A path inside ``run_storage``'s file system (as :func:`persisted_checkpoints` lists them) as a
    location the rest of the code can open: the path itself locally, ``scheme://path`` in an object store."""
    return path if "://" not in run_storage else f"{run_storage.split('://', 1)[0]}://{path}"


def checkpoint_step(folder: str | None) -> int:
    """The step a vit checkpoint folder was saved at (-1 for none)."""
    from vit.checkpoint import load_checkpoint

    return -1 if folder is None else int(load_checkpoint(folder)["step"])


def persisted_checkpoints(run_storage: str):
    """(file system, checkpoint folders of a Ray Train run's storage, oldest first): Ray names them
    ``checkpoint_<date>_<time>``, so their names sort by time. No folders when the storage is absent."""
    import pyarrow.fs as pafs

    fs, root = _filesystem(run_storage)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return fs, []
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def _filesystem(run_storage: str):
    """(pyarrow file system, path in it) of a run's storage, local or a URI, patient with an object store
    that goes away for a while (as Ray's own persisting is: :func:`ray_storage`)."""
    from pipeline.storage import patient_filesystem

    return patient_filesystem(run_storage)


def newest_persisted_checkpoint(run_storage: str | None, than_step: int, scratch: str | Path) -> str | None:
    """A complete checkpoint of this run newer than ``than_step``, as a local folder, or None. A checkpoint
    in remote storage is copied into a new folder under ``scratch`` (the caller's, removed by the caller).

    Ray Train registers a checkpoint when its controller collects the worker's report, which comes after
    the worker has persisted it: a worker killed in between (SIGKILL, OOM, a lost node) would make the
    replacement start from the previous checkpoint, or from step 0. The run's storage holds the newer
    one, complete (a partial copy fails to load and is passed over), so resuming from it loses nothing.
    """
    if not run_storage:
        return None
    import pyarrow.fs as pafs

    from vit.checkpoint import load_checkpoint

    fs, names = persisted_checkpoints(run_storage)
    local = "://" not in run_storage
    for path in reversed(names[-3:]):  # newest first
        folder = path if local else tempfile.mkdtemp(prefix="persisted-", dir=scratch)
        try:
            if not local:
                pafs.copy_files(path, folder, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            step = int(load_checkpoint(folder)["step"])
        except Exception:  # incomplete (being written when the worker died): try the one before
            continue
        return folder if step > than_step else None
    return None


def _quiet_ray_train_reports() -> None:
    """Ray Train V2 logs every ``report`` call with its whole metrics dict at INFO level (a line per log
    step, next to our own progress line): keep its warnings only. Its logger is named by file path."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def pin_teacher(tracking_uri: str, train: TrainConfig, class_names: Sequence[str], *,
                key: str) -> tuple[TrainConfig, TeacherWeights | None]:
    """The training config with its distillation teacher checked and pinned, and the teacher's weights, on
    the driver before any worker starts: the teacher must be a vitflow ViT predicting exactly these classes,
    and an alias (``models:/name@champion``) is replaced by the version it points at now, so that every
    rank, every restarted worker group and every trial distils from the same weights. ``key`` names the
    setting in errors (``train.distill.teacher``)."""
    from vit.data import check_class_map

    if train.distill is None:
        return train, None
    teacher_uri = train.distill.teacher
    try:
        teacher = tracking.load_plain_model(tracking_uri, teacher_uri)
        check_class_map(teacher.class_names, list(class_names), f"the teacher {teacher_uri}", "the data")
    except ValueError as error:
        raise ValueError(f"{key}: {error}") from None
    version = tracking.resolve_version(tracking_uri, teacher_uri)
    if version is not None and "@" in teacher_uri:
        teacher_uri = f"models:/{teacher_uri.removeprefix('models:/').split('@', 1)[0]}/{version}"
    pinned = replace(train, distill=replace(train.distill, teacher=teacher_uri))
    return pinned, TeacherWeights(state_dict=teacher.state_dict, config=teacher.config, uri=teacher_uri)


def load_teacher(weights: TeacherWeights):
    """A worker's frozen teacher (``vit.distill.Teacher``), answering at its own resolution."""
    import ray

    from vit import VisionTransformer
    from vit.distill import Teacher

    state_dict = weights.state_dict
    if isinstance(state_dict, ray.ObjectRef):  # large weights travel through the object store
        state_dict = ray.get(state_dict)
    model = VisionTransformer(weights.config)
    model.load_state_dict(state_dict)
    return Teacher(model, image_size=weights.config.image_size)


def initial_model(spec: WorkerSpec):
    """A fresh model for pre-training (its weights drawn from ``train.seed``: a run is repeatable), or the
    paper's fine-tuning start: the pre-trained weights with position embeddings resampled to the new grid
    and a zero-initialised head (``vit.finetune``)."""
    from vit import VisionTransformer
    from vit.finetune import prepare_finetune_model

    target, pretrained = spec.model, spec.pretrained
    if pretrained is None:
        return VisionTransformer(target, seed=spec.train.seed)
    import ray

    state_dict = pretrained.state_dict
    if isinstance(state_dict, ray.ObjectRef):  # large weights travel through the object store
        state_dict = ray.get(state_dict)
    return prepare_finetune_model(state_dict, pretrained.config, image_size=target.image_size,
                                  num_classes=target.num_classes, mode=pretrained.mode)


class Progress:
    """One line per log step on rank 0: step, loss, img/s (all ranks), ETA. With a time budget the last
    step is the loop's current plan (``train/planned_steps``), not ``total_steps``."""

    def __init__(self, total_steps: int, images_per_step: int):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.start = time.monotonic()
        self.start_step: int | None = None

    def print(self, step: int, metrics: dict[str, float]) -> None:
        if self.start_step is None:
            self.start_step, self.start = step, time.monotonic()
            rate = 0.0
        else:
            rate = (step - self.start_step) / max(time.monotonic() - self.start, 1e-9)
        self.total_steps = int(metrics.get("train/planned_steps", self.total_steps))
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        fields = [f"step {step}/{self.total_steps}"]
        if "train/loss" in metrics:
            fields.append(f"loss {metrics['train/loss']:.4f}")
        if rate > 0:
            fields.append(f"{rate * self.images_per_step:.0f} img/s")
            fields.append(f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        if "val/top1" in metrics:
            fields.append(f"val top-1 {metrics['val/top1']:.2%}")
        if f"{EMA_PREFIX}top1" in metrics:
            fields.append(f"EMA {metrics[f'{EMA_PREFIX}top1']:.2%}")
        print(" | ".join(fields), flush=True)

