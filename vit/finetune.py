"""The paper's fine-tuning recipe (Section 3.2, Appendix B.1.1): a pre-trained ViT moved to a new task and
resolution, trained in full or as a linear probe.

- The pre-trained prediction head is removed and a zero-initialised D x K head attached; the learned
  position embeddings are 2D-interpolated to the new patch grid (``vit.checkpoint.load_pretrained``).
- SGD with momentum 0.9, no weight decay, linear warmup then cosine decay, gradient clipping at global
  norm 1 (:func:`paper_finetune_optim`). AdamW and layer-wise lr decay (``OptimConfig.layer_decay``) are
  options of the same ``OptimConfig``.

The linear probe and ``vit.loop.fit``
-------------------------------------
``fit`` puts the whole model in train mode (``model.train()``, again after every evaluation), so a probe
cannot count on its backbone staying in eval mode. It does not have to: a ViT has no batch norm, so
dropout and stochastic depth are its only train/eval differences, and the probe's model is built with
both at zero. Its train mode then computes exactly its eval mode's function. The backbone's parameters
have ``requires_grad=False``: ``vit.optim.param_groups`` leaves them out of the optimiser (no momentum, no
weight decay, so they stay bit-identical), autograd records nothing through them, and gradient clipping
sees the head's gradient alone. Resuming a probe from a checkpoint means preparing the model the same way
first: ``requires_grad`` is not part of a state dict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from vit.checkpoint import load_pretrained
from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.optim import OptimConfig

FinetuneMode = Literal["full", "linear_probe"]
MODES = ("full", "linear_probe")


def paper_finetune_optim(lr: float = 0.01, *, warmup_steps: int = 0, **overrides: Any) -> OptimConfig:
    """The paper's fine-tuning optimiser (Appendix B.1.1): SGD, momentum 0.9, no weight decay, warmup then
    cosine to zero, gradient clipping at global norm 1. The paper picks ``lr`` from {0.001, 0.003, 0.01,
    0.03} (Table 4). ``warmup_steps`` depends on the run's length, which is the caller's (big_vision's
    transfer configs warm up for 500 of 20,000 steps); ``overrides`` change single fields, e.g.
    ``optimizer="adamw"`` or ``layer_decay=0.75``."""
    fields: dict[str, Any] = dict(optimizer="sgd", lr=lr, momentum=0.9, weight_decay=0.0, warmup_steps=warmup_steps,
                                  min_lr_ratio=0.0, grad_clip_norm=1.0)
    fields.update(overrides)
    return OptimConfig(**fields)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """How a pre-trained model becomes a downstream one. The class count comes from the downstream data,
    the step count from the ``TrainConfig`` that ``optim`` goes into."""

    image_size: int = 224  # square; higher than pre-training's often helps (Section 3.2)
    mode: FinetuneMode = "full"  # "linear_probe": a frozen backbone, only the head trains
    optim: OptimConfig = field(default_factory=paper_finetune_optim)

    def __post_init__(self) -> None:
        if isinstance(self.optim, Mapping):
            object.__setattr__(self, "optim", OptimConfig.from_dict(dict(self.optim)))
        problems = []
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool) or self.image_size < 1:
            problems.append(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "linear_probe" and self.optim.layer_decay is not None:
            problems.append("optim.layer_decay has no effect in linear_probe mode (only the head trains); leave it None")
        if problems:
            raise ValueError("invalid FinetuneConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with some fields changed, validated again (e.g. one trial's image size and lr)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mode": self.mode, "optim": self.optim.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown FinetuneConfig keys: {', '.join(unknown)}")
        return cls(**data)


def prepare_finetune_model(
    state_dict: Mapping[str, torch.Tensor],
    source: ViTConfig,
    *,
    image_size: int | tuple[int, int],
    num_classes: int,
    mode: FinetuneMode = "full",
) -> VisionTransformer:
    """A model for fine-tuning built from pre-trained ``state_dict`` (trained with ``source``): position
    embeddings resampled to ``image_size``'s patch grid, a zero-initialised head for ``num_classes``.

    The head is replaced even when the class count is unchanged: the recipe never reuses the pre-trained
    head. In ``"linear_probe"`` mode dropout and stochastic depth are off and only ``head.*`` trains (see
    the module docstring for how that meets ``vit.loop.fit``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"fine-tuning needs num_classes >= 1, got {num_classes!r}")
    target = source.replace(image_size=image_size, num_classes=num_classes)
    if mode == "linear_probe":
        target = target.replace(dropout=0.0, attn_dropout=0.0, drop_path=0.0)
    model = load_pretrained(state_dict, source, target)
    # load_pretrained keeps a head whose shape still fits; Section 3.2 always starts from a zero head.
    model.reset_head(num_classes)
    if mode == "linear_probe":
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("head."))
    return model
