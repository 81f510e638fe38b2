"""Weight EMA: an exponential moving average of a model's weights, kept beside the trained weights and
evaluated with them (DeiT and AugReg train with one; Polyak & Juditsky 1992).

The averaged copy and its update are PyTorch's own ``torch.optim.swa_utils.AveragedModel`` (one fused
``torch._foreach_lerp_`` over all parameters and buffers a step, a ``n_averaged`` counter in its state
dict, so a checkpoint holds everything needed to resume it exactly). What it lacks is a warm-up: with
decay 0.9999 the average of a short run is mostly the random initialisation. This module adds
TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule as the averaging function: the decay used
at update ``n`` is ``min(decay, (1 + n) / (10 + n))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

EMA_PREFIX = "val_ema/"  # the EMA weights' validation metrics, beside the raw weights' val/...


@dataclass(frozen=True, kw_only=True)
class EmaConfig:
    """``decay``: the weight of the running average at each optimiser step (0.9998 for DeiT's 300 epochs;
    shorter runs want less). ``warmup``: ramp the decay up from 0.1 as ``(1 + n) / (10 + n)``."""

    decay: float = 0.9998
    warmup: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 < self.decay < 1:
            raise ValueError(f"invalid EmaConfig: decay must be in (0, 1), got {self.decay!r}")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"invalid EmaConfig: warmup must be true or false, got {self.warmup!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmaConfig:
        unknown = sorted(set(data) - {"decay", "warmup"})
        if unknown:
            raise ValueError(f"unknown EmaConfig keys: {', '.join(unknown)}")
        return cls(**data)


def decay_at(config: EmaConfig, num_updates: int) -> float:
    """The decay applied by update number ``num_updates`` (0 for the first update after the copy)."""
    if not config.warmup:
        return config.decay
    return min(config.decay, (1 + num_updates) / (10 + num_updates))


class WeightEMA:
    """The EMA of ``model``'s parameters and buffers. ``update(model)`` after each optimiser step;
    ``module`` is the averaged model (same class, same config), to evaluate or save."""

    def __init__(self, model: nn.Module, config: EmaConfig):
        self.config = config
        # AveragedModel's own count (``n_averaged``) lives on the model's device: reading it every step
        # would wait for the device. This host-side copy is the same number, set again on load.
        self._updates = 0

        def average(averaged: list[torch.Tensor], current: list[torch.Tensor], _: torch.Tensor) -> None:
            # AveragedModel copies the weights on its first update and calls this from the second on.
            torch._foreach_lerp_(averaged, current, 1.0 - decay_at(config, self._updates - 1))

        self.averaged = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def num_updates(self) -> int:
        return self._updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)
        self._updates += 1

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averaged.load_state_dict(state)
        self._updates = int(self.averaged.n_averaged)


def ema_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The averaged model's own state dict out of a :meth:`WeightEMA.state_dict` (``module.`` keys)."""
    return {key.removeprefix("module."): value for key, value in state.items() if key.startswith("module.")}


def better_weights(metrics: Mapping[str, float]) -> str:
    """``"ema"`` when the EMA weights' validation top-1 beats the raw weights' (``val_ema/top1`` >
    ``val/top1``; a tie goes to the lower validation loss, then to the raw weights), else ``"raw"``."""
    if f"{EMA_PREFIX}top1" not in metrics or "val/top1" not in metrics:
        return "raw"
    ema, raw = metrics[f"{EMA_PREFIX}top1"], metrics["val/top1"]
    if ema != raw:
        return "ema" if ema > raw else "raw"
    return "ema" if metrics.get(f"{EMA_PREFIX}loss", float("inf")) < metrics.get("val/loss", float("inf")) else "raw"
