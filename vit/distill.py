"""Knowledge distillation from a frozen teacher (Hinton et al. 2015; DeiT, Touvron et al. 2021, Section 5).

The student's loss mixes the ordinary cross-entropy with a term that pulls it towards the teacher:

- ``soft``: ``(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
  Hinton's loss (T^2 keeps the gradient's scale as T changes);
- ``hard``: ``(1 - alpha) * CE(student, targets) + alpha * CE(student, argmax teacher)``, DeiT's hard-label
  distillation (DeiT's 0.5 / 0.5 is ``alpha = 0.5``), which DeiT found better than the soft loss for ViTs.

DeiT also adds a distillation token with its own head; vitflow's student is the paper's ViT, so both
losses act on its one [class]-token head (DeiT's Table 3 "usual distillation" / "hard distillation" rows).

The teacher (:class:`Teacher`) is frozen and always in eval mode, runs under ``torch.no_grad`` in the
student's precision, and sees each (augmented, mixed) batch at its own resolution: a teacher fine-tuned at
384 px teaching a 224 px student gets the same crops resized to 384 (bilinear, antialiased; resizing
commutes with the per-channel normalisation, so normalised images are resized as they are).
torchvision's and timm's distillation helpers are written for their own trainers; this is the loss and a
wrapper, nothing more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("soft", "hard")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """``teacher`` names the teacher for whoever builds it (a model URI in a workflow); the loop is given the
    teacher module itself."""

    teacher: str
    kind: Literal["soft", "hard"] = "hard"
    alpha: float = 0.5  # the distillation term's weight; the cross-entropy with the labels gets 1 - alpha
    temperature: float = 1.0  # soft only

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            problems.append(f"teacher must name a model (a models:/ or runs:/ URI, or a folder), got {self.teacher!r}")
        if self.kind not in KINDS:
            problems.append(f"kind must be 'soft' or 'hard', got {self.kind!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            problems.append(f"alpha must be in [0, 1], got {self.alpha!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        elif self.kind == "hard" and self.temperature != 1.0:
            problems.append("temperature applies to kind 'soft' only (hard distillation takes the teacher's argmax)")
        if problems:
            raise ValueError("invalid DistillConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown DistillConfig keys: {', '.join(unknown)}")
        return cls(**data)


class Teacher(nn.Module):
    """A frozen model that answers at its own input resolution. ``train()`` leaves it in eval mode."""

    def __init__(self, model: nn.Module, image_size: tuple[int, int]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = tuple(image_size)

    def train(self, mode: bool = True) -> Teacher:  # noqa: ARG002 - a teacher never trains
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K) logits for the (B, 3, H, W) student batch, resized to the teacher's resolution first."""
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        return self.model(images)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      config: DistillConfig, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """The student's loss (module docstring). ``targets`` are (B,) labels or (B, K) MixUp/CutMix soft
    targets; logits are (B, K), compared in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"the teacher's logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(student_logits.shape)}: teacher and student must predict the same classes")
    student, teacher = student_logits.float(), teacher_logits.float()
    base = F.cross_entropy(student, targets, label_smoothing=label_smoothing)
    if config.kind == "soft":
        t = config.temperature
        term = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)
    else:
        term = F.cross_entropy(student, teacher.argmax(dim=1))
    return (1 - config.alpha) * base + config.alpha * term
