"""The training loop: ``fit`` (train, evaluate, checkpoint, resume) and ``evaluate``. Plain PyTorch.

The loop talks to the outside world through two things only (STYLE.md, "every boundary is a contract"):

- ``report(step, metrics, checkpoint_dir=None)``, a callable it is given. Every rank calls it at the same
  steps (log, eval and checkpoint steps), so a caller may wrap a collective such as ``ray.train.report``;
  only rank 0 writes checkpoints, and passes ``checkpoint_dir`` where it did.
- checkpoint directories ``<checkpoint_dir>/step-NNNNNN/checkpoint.pt``, written and read by
  ``vit.checkpoint`` (which owns their layout): plain tensors and primitive containers that load with
  ``torch.load(weights_only=True)``.

Distributed training is the caller's business: it passes ``rank`` and a ``prepare_model`` hook (e.g. one
that wraps the model in ``DistributedDataParallel``); gradient accumulation then skips the gradient
all-reduce on all but the last micro-batch (``no_sync``). ``evaluate`` all-reduces its sums through an
injected callable, or ``torch.distributed`` when a process group is initialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from vit.checkpoint import (
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from vit.config import ViTConfig
from vit.data import check_class_map
from vit.data.plan import derive_seed
from vit.distill import DistillConfig, distillation_loss
from vit.ema import EMA_PREFIX, EmaConfig, WeightEMA
from vit.flops import train_flops
from vit.optim import OptimConfig, build_optimizer, build_schedule
from vit.precision import CHOICES, PrecisionChoice, autocast, probe, resolve_precision

log = logging.getLogger(__name__)

# A time budget plans on a training step's seconds averaged over the log windows with this weight on the
# newest: about the last three windows, so that one noisy window (a neighbour process, a slow batch) moves
# the plan little, while a steady slowing (seen: 18% over an hour) is followed within a few windows.
STEP_TIME_SMOOTHING = 0.3


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN or infinite: the run diverged (early-stopping signal for
    tuning)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. A step is one optimiser step of ``grad_accum_steps`` loader batches."""

    total_steps: int
    optim: OptimConfig = field(default_factory=OptimConfig)
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    # auto: chosen for the training device (vit.precision); bf16: autocast (CPU or CUDA); fp16: autocast +
    # GradScaler (CUDA only); fp32: no autocast
    precision: PrecisionChoice = "auto"
    compile: bool = False  # torch.compile the training forward
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 0  # 0: checkpoint only at the end
    seed: int = 0  # dropout / stochastic depth randomness (per rank: derived from seed and rank)
    # an EMA of the weights (vit.ema), evaluated beside them as val_ema/...; None: off
    ema: EmaConfig | None = None
    # knowledge distillation from a frozen teacher (vit.distill), which fit is given; None: off
    distill: DistillConfig | None = None
    # a wall-clock budget for fit (training, evaluations, checkpoints), in seconds: the run re-plans its
    # last step at every log step from the speed measured so far and ends on the clock, the cosine fitted
    # to the steps it will take; total_steps is then the most it may take. None: exactly total_steps.
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.optim, Mapping):
            object.__setattr__(self, "optim", OptimConfig.from_dict(dict(self.optim)))
        if isinstance(self.ema, Mapping):
            object.__setattr__(self, "ema", EmaConfig.from_dict(dict(self.ema)))
        if isinstance(self.distill, Mapping):
            object.__setattr__(self, "distill", DistillConfig.from_dict(dict(self.distill)))
        problems = []
        for name in ("total_steps", "grad_accum_steps", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.time_budget_s is not None and (isinstance(self.time_budget_s, bool)
                                               or not isinstance(self.time_budget_s, (int, float))
                                               or not self.time_budget_s > 0):
            problems.append(f"time_budget_s must be a number of seconds > 0 or None, got {self.time_budget_s!r}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.precision not in CHOICES:
            problems.append(f"precision must be one of {', '.join(repr(c) for c in CHOICES)}, got {self.precision!r}")
        if isinstance(self.total_steps, int) and self.optim.warmup_steps > self.total_steps:
            problems.append(f"optim.warmup_steps {self.optim.warmup_steps} exceed total_steps {self.total_steps}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["optim"] = self.optim.to_dict()
        data["ema"] = self.ema.to_dict() if self.ema is not None else None
        data["distill"] = self.distill.to_dict() if self.distill is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)}")
        return cls(**data)


class EpochData(Protocol):
    """What ``fit`` trains on (``vit.data.ShardLoader`` is one): the same number of batches on every
    rank, and an epoch that can start at a given batch. Batches are ``(images, targets, ...)``; targets are
    (B,) class indices or (B, K) soft targets."""

    batches_per_epoch: int

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterable[Any]: ...


class Report(Protocol):
    def __call__(self, step: int, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None: ...


# --- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Any], *, device: str | torch.device = "cpu",
             precision: PrecisionChoice = "fp32",
             all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> dict[str, float]:
    """Loss (cross-entropy, no smoothing), top-1 and top-5 accuracy over every batch of ``data``.

    With several ranks each passes its own share; the sums are combined by ``all_reduce`` (a sum,
    in place or returned), or by ``torch.distributed.all_reduce`` when a process group is initialised.
    Pass ``all_reduce=lambda t: t`` to evaluate one rank's share alone. Give the model unwrapped (not
    DDP): ranks may hold different batch counts, and only this final reduction synchronises them.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, probe(device))
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, samples
    for batch in data:
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(precision, device):
            logits = model(images)
        logits = logits.float()  # (B, K)
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        loss = F.cross_entropy(logits, targets, reduction="sum")
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (B, k)
        sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double(),
                             torch.tensor(float(len(labels)), dtype=torch.float64, device=device)])
    sums = _sum_across_ranks(sums, all_reduce)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise ValueError("evaluate got no samples")
    return {"loss": loss / count, "top1": top1 / count, "top5": top5 / count, "num_samples": int(count)}


def _sum_across_ranks(values: torch.Tensor, all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None) -> torch.Tensor:
    """``values`` summed over the ranks: by ``all_reduce`` (in place or returned), else by
    ``torch.distributed`` when a process group is initialised, else as they are (one process)."""
    if all_reduce is not None:
        reduced = all_reduce(values)
        return values if reduced is None else reduced
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # framework touch point
        torch.distributed.all_reduce(values)
    return values


# --- training ------------------------------------------------------------------------------------


def _mean_across_ranks(values: list[float], all_reduce, device: torch.device) -> list[float]:
    """Each value's mean over the ranks (one all-reduce), so that every rank decides alike."""
    summed = _sum_across_ranks(torch.tensor([*values, 1.0], dtype=torch.float64, device=device), all_reduce)
    return (summed[:-1] / summed[-1]).tolist()


def steps_within(remaining_s: float, *, train_s_per_step: float, pause_s_per_step: float, final_s: float) -> int:
    """How many more optimiser steps fit in ``remaining_s`` seconds: each step costs its training time plus
    its share of the evaluations and checkpoints (as measured so far), and the last one its own final
    evaluation and checkpoint (``final_s``) on top. 0 when not even one fits."""
    per_step = train_s_per_step + pause_s_per_step
    if per_step <= 0:
        raise ValueError(f"a step must take some time to plan on, got {per_step} s")
    return max(0, math.floor((remaining_s - final_s) / per_step))


def _batches(data: EpochData, epoch: int, start: int) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batches of it consumed so far, batch), forever, from batch ``start`` of ``epoch``."""
    while True:
        for index, batch in enumerate(data.epoch(epoch, start), start=start):
            yield epoch, index + 1, batch
        epoch, start = epoch + 1, 0


def fit(
    model: nn.Module,
    train_data: EpochData,
    eval_data: Iterable[Any] | None,
    config: TrainConfig,
    *,
    report: Report,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    device: str | torch.device = "cpu",
    rank: int = 0,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    metadata: Mapping[str, Any] | None = None,
    peak_flops: float | None = None,
    teacher: nn.Module | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Train ``model`` for exactly ``config.total_steps`` optimiser steps (or, with ``config.time_budget_s``,
    for as many as fit in that many seconds, at most ``total_steps``); return the last metrics.

    ``prepare_model`` runs after the model is on ``device`` and its weights are restored (e.g. to wrap it
    in DDP); checkpoints and evaluation use the unwrapped ``model``. ``resume_from`` is a checkpoint
    directory this function wrote: the run continues at its step, schedule and data position.
    ``metadata`` (plain JSON-like values: data config, class names) is stored in every checkpoint.
    ``config.precision`` is resolved for ``device`` here (``auto``: see ``vit.precision``); checkpoints
    record the precision used.

    With ``config.ema`` an exponential moving average of the weights (``vit.ema``) is updated after every
    optimiser step on every rank, evaluated beside the weights at each evaluation (``val_ema/...``), and
    saved in (and resumed exactly from) every checkpoint.

    With ``config.distill`` the loss is ``vit.distill.distillation_loss`` against ``teacher`` (a
    ``vit.distill.Teacher``: frozen, in eval mode, at its own resolution), which runs in the same precision
    on every rank; the teacher is an input, not trained state: it is not checkpointed.

    Each log step also reports this rank's speed over the window since the last: ``perf/images_per_sec``,
    ``perf/data_wait_fraction`` (the share of the window's training time spent waiting for the next batch)
    and, given the device's ``peak_flops`` (``vit.perf.peak_flops``), ``perf/mfu``: model training FLOPs per
    second (``vit.flops.train_flops``) over that peak.

    With ``config.time_budget_s`` the run ends on the clock. At every log step it measures the seconds a
    training step takes (averaged over the recent windows: ``STEP_TIME_SMOOTHING``), what evaluations and
    checkpoints have cost per step so far
    (the longest of them again for the final one), and re-plans its last step to what is left of the
    budget (:func:`steps_within`); the cosine schedule goes on from where it is to the new last step
    (``vit.optim.WarmupCosine.replan``), so it always ends at its floor on the run's final step. The
    ranks plan on their mean measurements (one all-reduce at each log step: every rank ends at the same
    step). ``train/planned_steps`` and ``train/budget_left_s`` are reported at each log step. A
    checkpoint holds the budget's seconds used, and a resumed run goes on with what was left (the time
    between the failure and the resume is not counted). Such a run is not reproducible step for step: its
    last step depends on the machine's speed. ``clock`` (monotonic seconds) is what every time
    above is read from: the speed metrics and the budget.
    """
    if (config.distill is None) != (teacher is None):
        raise ValueError("fit: a teacher needs train.distill, and train.distill needs a teacher "
                         f"(distill: {config.distill}; teacher given: {teacher is not None})")
    entered = clock()  # a time budget counts from here: all that fit does is in it
    device = torch.device(device)
    precision = resolve_precision(config.precision, probe(device))
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = build_optimizer(model, config.optim)
    schedule = build_schedule(optimizer, config.optim, config.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = WeightEMA(model, config.ema) if config.ema is not None else None
    plan = schedule.lr_lambdas[0]  # a vit.optim.WarmupCosine: its planned last step is restored with it
    step, epoch, batch_in_epoch = 0, 0, 0
    budget_used = 0.0  # seconds of config.time_budget_s used before this call (a resumed run's)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        trained_on = state.get("metadata", {}).get("class_names")
        given = (metadata or {}).get("class_names")
        if trained_on is not None and given is not None:
            check_class_map(trained_on, given, f"{resume_from}: the checkpoint's head", "the data")
        step, epoch, batch_in_epoch = restore_training_state(state, model=model, optimizer=optimizer,
                                                             schedule=schedule, scaler=scaler, ema=ema,
                                                             origin=str(resume_from))
        # The schedule's shape is this config's, as it always was (a run resumed with more total_steps trains
        # on to them). A time budget's plan goes on from where the checkpoint's had brought the cosine, up to
        # the ceiling until the first log step re-plans it on what is left of the budget; a checkpoint of
        # the plan's last step is a finished run (it ended on its budget), resumed as such.
        plan.warmup_steps, plan.min_lr_ratio = config.optim.warmup_steps, config.optim.min_lr_ratio
        if config.time_budget_s is None:
            plan.total_steps, plan.anchor_step, plan.anchor_progress = config.total_steps, 0, 0.0
        else:
            budget_used = float(state.get("time_budget_used_s", 0.0))
            if step < plan.total_steps:
                plan.replan(step, max(step, config.total_steps))
        if rank != 0:  # only rank 0's generators were saved; the others start a fresh, distinct stream
            torch.manual_seed(derive_seed(config.seed, rank, step))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, batch_in_epoch)
    else:
        torch.manual_seed(derive_seed(config.seed, rank))
    prepared = prepare_model(model) if prepare_model is not None else model
    no_sync = getattr(prepared, "no_sync", None)  # DDP: skip the all-reduce on accumulation micro-batches
    forward = torch.compile(prepared) if config.compile else prepared

    latest: dict[str, float] = {}
    if step >= plan.total_steps or (config.time_budget_s is not None and budget_used >= config.time_budget_s):
        return latest  # done: every step planned taken, or all of the budget used
    extra = dict(metadata or {})
    stream = _batches(train_data, epoch, batch_in_epoch)
    accum = config.grad_accum_steps
    loss_sum, logged_steps, images_seen = torch.zeros((), device=device), 0, 0
    tick, paused = clock(), 0.0  # paused: evaluation and checkpoint time, not counted in img/s
    waited = 0.0  # time spent in the loader's next() this window
    flops_per_image = train_flops(model.config) if isinstance(getattr(model, "config", None), ViTConfig) else None
    # The time budget's accounting: its clock (started budget_used ago), and what evaluations and
    # checkpoints cost in this call: in all, the longest at one step, and over how many steps.
    clock_start, paused_total, longest_pause, first_step = entered - budget_used, 0.0, 0.0, step
    warned = False  # that the budget ends the run inside its warm-up
    step_s: float | None = None  # a training step's seconds, an exponential average over the log windows
    forward.train()
    try:
        while step < plan.total_steps:
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                asked = clock()
                epoch, batch_in_epoch, batch = next(stream)
                waited += clock() - asked
                images = batch[0].to(device, non_blocking=True)
                targets = batch[1].to(device, non_blocking=True)
                sync = no_sync() if no_sync is not None and micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast(precision, device):
                        logits = forward(images)  # (B, K)
                        taught = teacher(images) if teacher is not None else None
                    if taught is None:
                        loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
                    else:
                        loss = distillation_loss(logits, taught, targets, config.distill,
                                                 label_smoothing=config.label_smoothing)
                    scaler.scale(loss / accum).backward()
                step_loss += loss.detach() / accum
                images_seen += images.shape[0]
            if not torch.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"training loss is {step_loss.item()} at step {step + 1} (epoch {epoch}); the run diverged "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}, precision {precision})"
                )
            scaler.unscale_(optimizer)
            max_norm = config.optim.grad_clip_norm if config.optim.grad_clip_norm is not None else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if not torch.isfinite(grad_norm) and not scaler.is_enabled():
                # Without fp16 loss scaling (which skips such steps by design), a non-finite gradient is
                # divergence even while the loss still reads finite (overflowing weights: loss ~1e30).
                raise NonFiniteLossError(
                    f"gradient norm is {grad_norm.item()} at step {step + 1} (epoch {epoch}); the run diverged "
                    f"(lr {optimizer.param_groups[0]['lr']:.3g}, precision {precision})"
                )
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            if ema is not None:
                ema.update(model)
            step += 1
            if batch_in_epoch == train_data.batches_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            loss_sum += step_loss
            logged_steps += 1

            metrics: dict[str, float] = {}
            final = step >= plan.total_steps
            if step % config.log_every == 0 or final:
                loss_value = (loss_sum / logged_steps).item()  # waits for the device: the window ends here
                elapsed = max(clock() - tick - paused, 1e-9)
                rate = images_seen / elapsed  # this rank's
                paused_total += paused
                if config.time_budget_s is not None:
                    window_s = elapsed / logged_steps  # a training step's seconds, smoothed over the windows
                    step_s = window_s if step_s is None else (1 - STEP_TIME_SMOOTHING) * step_s + STEP_TIME_SMOOTHING * window_s
                    train_s, pause_s, final_s, used = _mean_across_ranks(
                        [step_s, paused_total / (step - first_step), longest_pause,
                         clock() - clock_start], all_reduce, device)
                    left = config.time_budget_s - used
                    if not final:
                        more = steps_within(left, train_s_per_step=train_s, pause_s_per_step=pause_s, final_s=final_s)
                        plan.replan(step, min(config.total_steps, step + more))
                        final = step >= plan.total_steps
                        if plan.total_steps < plan.warmup_steps and not warned:
                            warned = True
                            log.warning("train.time_budget_s %.0f s ends the run at step %d, inside its warm-up "
                                        "(optim.warmup_steps %d): the lr never reaches its peak", config.time_budget_s,
                                        plan.total_steps, plan.warmup_steps)
                    metrics.update({"train/planned_steps": plan.total_steps, "train/budget_left_s": left})
                metrics.update({
                    "train/loss": loss_value,
                    "train/lr": lr,
                    "train/grad_norm": float(grad_norm),
                    "train/images_per_sec": rate,
                    "train/epoch": epoch + batch_in_epoch / train_data.batches_per_epoch,
                    "perf/images_per_sec": rate,
                    "perf/data_wait_fraction": min(waited / elapsed, 1.0),
                })
                if peak_flops and flops_per_image:
                    metrics["perf/mfu"] = rate * flops_per_image / peak_flops
                stats = getattr(train_data, "stats", None)
                if stats is not None:
                    metrics.update({"data/bad_samples": stats.bad_samples, "data/bad_shards": stats.bad_shards})
                loss_sum.zero_()
                logged_steps, images_seen, waited = 0, 0, 0.0
                tick, paused = clock(), 0.0
            started = clock()
            if eval_data is not None and (final or (config.eval_every and step % config.eval_every == 0)):
                results = evaluate(model, eval_data, device=device, precision=precision, all_reduce=all_reduce)
                metrics.update({f"val/{name}": value for name, value in results.items()})
                if ema is not None:
                    results = evaluate(ema.module, eval_data, device=device, precision=precision, all_reduce=all_reduce)
                    metrics.update({f"{EMA_PREFIX}{name}": value for name, value in results.items()
                                    if name != "num_samples"})
                forward.train()
            saved = None
            if final or (config.checkpoint_every and step % config.checkpoint_every == 0):
                if rank == 0 and checkpoint_dir is not None:
                    used = clock() - clock_start if config.time_budget_s is not None else None
                    saved = save_checkpoint(checkpoint_dir, training_state(
                        model=model, optimizer=optimizer, schedule=schedule, scaler=scaler, step=step, epoch=epoch,
                        batch_in_epoch=batch_in_epoch, train_config=config.to_dict(), precision=precision,
                        metadata=extra, ema=ema, time_budget_used_s=used))
                metrics.setdefault("train/epoch", epoch + batch_in_epoch / train_data.batches_per_epoch)
            if metrics:
                latest.update(metrics)
                log.info("step %d/%d %s", step, plan.total_steps,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                report(step, metrics, checkpoint_dir=str(saved) if saved is not None else None)
            took = clock() - started
            paused, longest_pause = paused + took, max(longest_pause, took)
    finally:
        stream.close()  # shuts down the epoch's loader workers
    return latest
