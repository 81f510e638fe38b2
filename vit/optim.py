"""Optimisers and learning-rate schedules for pre-training (AdamW) and fine-tuning (SGD with momentum).

Weight decay follows the reference implementations (timm, big_vision, DeiT): it applies to weight
matrices only, not to norms, biases, the position embeddings or the [class] token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimiser and schedule. ``lr`` is the peak, reached after ``warmup_steps``; the total step count
    comes from the training config."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    eps: float = 1e-8  # AdamW
    momentum: float = 0.9  # SGD (the paper's fine-tuning recipe)
    nesterov: bool = False  # SGD
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip_norm: float | None = 1.0  # global L2 norm; None: no clipping
    layer_decay: float | None = None  # fine-tuning: layer-wise lr decay (see layer_decay_groups); None: off

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = []
        if self.optimizer not in ("adamw", "sgd"):
            problems.append(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two values in [0, 1), got {self.betas}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            problems.append("nesterov needs momentum > 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            problems.append(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            problems.append(f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            problems.append(f"layer_decay must be in (0, 1] or None, got {self.layer_decay}")
        if problems:
            raise ValueError("invalid OptimConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown OptimConfig keys: {', '.join(unknown)}")
        return cls(**data)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: "decay" (weight matrices) and "no_decay" (ndim <= 1, i.e. norms and biases, plus the
    names in ``model.no_weight_decay()``: position embeddings and the [class] token). Frozen
    parameters are left out. :func:`layer_decay_groups` splits these groups further by layer."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = param.ndim <= 1 or name in skip or any(name.endswith("." + s) for s in skip)
        (no_decay if excluded else decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def layer_id(name: str, depth: int) -> int:
    """The layer a ViT parameter belongs to for layer-wise lr decay, as in BEiT and timm's
    ``group_matcher``: the embeddings (patch projection, position embeddings, [class] token) are layer 0,
    block i is layer i + 1, the final norm and the head are layer ``depth + 1``."""
    if name.startswith(("patch_embed.", "pos_embed", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """:func:`param_groups` split by layer, each group with ``lr_scale = layer_decay ** (depth + 1 - layer)``
    (BEiT, Bao et al., ICLR 2022): 1 for the head and final norm, ``layer_decay ** (depth + 1)`` for
    the embeddings, so layers near the input move least when fine-tuning. Groups come deepest first:
    ``groups[0]`` holds the head at the peak lr, which is what ``vit.loop.fit`` logs as ``train/lr``."""
    depth = len(model.blocks)
    names = {id(param): name for name, param in model.named_parameters()}
    groups = []
    for base in param_groups(model, weight_decay):
        by_layer: dict[int, list[nn.Parameter]] = {}
        for param in base["params"]:
            by_layer.setdefault(layer_id(names[id(param)], depth), []).append(param)
        for layer, params in by_layer.items():
            groups.append({"name": f"layer_{layer}_{base['name']}", "params": params, "layer": layer,
                           "weight_decay": base["weight_decay"], "lr_scale": layer_decay ** (depth + 1 - layer)})
    return sorted(groups, key=lambda group: -group["layer"])  # stable: decay before no_decay within a layer


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters only (frozen ones never reach it: a linear probe's
    backbone gets no momentum or weight decay). With ``layer_decay`` each group gets its own base lr,
    which the ``LambdaLR`` of :func:`build_schedule` then scales, group by group."""
    if config.layer_decay is None:
        groups = param_groups(model, config.weight_decay)
    else:
        groups = layer_decay_groups(model, config.weight_decay, config.layer_decay)
        for group in groups:
            group["lr"] = config.lr * group["lr_scale"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr factor at ``step`` (the number of optimiser steps taken): linear from 1/warmup to 1 over
    ``warmup_steps``, then a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    return WarmupCosine(warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)(step)


@dataclass(kw_only=True)
class WarmupCosine:
    """The lr factor of :func:`warmup_cosine` as an object whose end can move: ``replan`` sets a new last
    step while keeping the factor continuous (the cosine goes on from the progress it had reached, over
    the steps now left), which is how a run with a time budget (``vit.loop.TrainConfig.time_budget_s``)
    ends on the clock. Its fields are plain numbers: ``LambdaLR.state_dict`` saves them (it keeps the
    ``__dict__`` of callable objects) and a checkpoint resumes the plan exactly. Never re-planned, it is
    :func:`warmup_cosine` to the last bit."""

    warmup_steps: int
    total_steps: int  # the planned last step
    min_lr_ratio: float
    anchor_step: int = 0  # the cosine reached ``anchor_progress`` at this step (set by replan)
    anchor_progress: float = 0.0

    def progress(self, step: int) -> float:
        """How far along the cosine ``step`` is (0 until the warm-up ends, 1 at ``total_steps``)."""
        if step < self.warmup_steps:
            return 0.0
        start = max(self.warmup_steps, self.anchor_step)
        left = (step - start) / max(1, self.total_steps - start)
        return min(1.0, self.anchor_progress + (1.0 - self.anchor_progress) * left)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))

    def replan(self, step: int, total_steps: int) -> None:
        """End the schedule at ``total_steps`` instead, from ``step`` (the optimiser steps taken) on."""
        if total_steps < step:
            raise ValueError(f"cannot end the schedule at step {total_steps}: {step} steps are already taken")
        if step >= self.warmup_steps:
            self.anchor_progress, self.anchor_step = self.progress(step), step
        self.total_steps = total_steps


def build_schedule(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """Warmup + cosine as a ``LambdaLR`` stepped once per optimiser step; its ``state_dict`` (the step
    count, base lrs and the :class:`WarmupCosine` plan) is all a checkpoint needs. The plan is
    ``schedule.lr_lambdas[0]`` (one object for every parameter group)."""
    if config.warmup_steps > total_steps:
        raise ValueError(f"warmup_steps {config.warmup_steps} exceed total_steps {total_steps}")
    plan = WarmupCosine(warmup_steps=config.warmup_steps, total_steps=total_steps, min_lr_ratio=config.min_lr_ratio)
    return LambdaLR(optimizer, plan)
