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
    parameters are left out. Layer-wise lr decay (fine-tuning) would split these groups further."""
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


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr factor at ``step`` (the number of optimiser steps taken): linear from 1/warmup to 1 over
    ``warmup_steps``, then a half cosine from 1 down to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """Warmup + cosine as a ``LambdaLR`` stepped once per optimiser step; its ``state_dict`` (the step
    count and base lrs) is all a checkpoint needs, the shape is rebuilt from the config."""
    if config.warmup_steps > total_steps:
        raise ValueError(f"warmup_steps {config.warmup_steps} exceed total_steps {total_steps}")

    def factor(step: int) -> float:
        return warmup_cosine(step, warmup_steps=config.warmup_steps, total_steps=total_steps,
                             min_lr_ratio=config.min_lr_ratio)

    return LambdaLR(optimizer, factor)
