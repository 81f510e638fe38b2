"""A classifier on a test split: predictions, accuracy metrics and the confusion matrix.

``vit.loop.evaluate`` keeps running sums for validation during training; this module keeps every logit
so a finished model can be examined class by class (``vitflow evaluate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vit.precision import PrecisionChoice, autocast, probe, resolve_precision


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Any], *, device: str | torch.device = "cpu",
            precision: PrecisionChoice = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, K) float32 and labels (N,) int64 on the CPU for every sample of ``batches`` (tuples of
    ``(images, targets, ...)``), in order. Soft targets (B, K) become their argmax. The model runs in eval
    mode and is left in the mode it came in."""
    device = torch.device(device)
    precision = resolve_precision(precision, probe(device))
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in batches:
            images, targets = batch[0].to(device, non_blocking=True), batch[1]
            with autocast(precision, device):
                logits.append(model(images).float().cpu())  # (B, K)
            labels.append((targets.argmax(dim=1) if targets.ndim == 2 else targets).long().cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("predict got no batches")
    return torch.cat(logits), torch.cat(labels)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Accuracy over a split. ``top5`` is top-min(5, K)."""

    top1: float
    top5: float
    per_class_accuracy: torch.Tensor  # (K,) float64: recall of each class; NaN for a class with no samples
    confusion_matrix: torch.Tensor  # (K, K) int64: rows are true classes, columns predicted ones
    class_names: tuple[str, ...]
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able values (NaN per-class accuracies become ``None``)."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "num_samples": self.num_samples,
            "per_class_accuracy": {name: (None if acc != acc else acc)
                                   for name, acc in zip(self.class_names, self.per_class_accuracy.tolist())},
            "confusion_matrix": self.confusion_matrix.tolist(),
            "class_names": list(self.class_names),
        }


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           class_names: Sequence[str] | None = None) -> ClassificationMetrics:
    """Top-1, top-5, per-class accuracy and the confusion matrix of (N, K) ``logits`` against (N,)
    ``labels``. Ties in the logits go to the lower class index (``argmax``'s rule)."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    count, num_classes = logits.shape
    if count == 0:
        raise ValueError("no samples to score")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    names = tuple(class_names) if class_names is not None else tuple(str(k) for k in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    predicted = logits.argmax(dim=1)  # (N,)
    top5 = (logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]).any(dim=1)  # (N,)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes)  # (K, K)
    support = confusion.sum(dim=1).double()  # (K,) samples per true class
    per_class = confusion.diagonal().double() / support  # 0 / 0 -> NaN for absent classes
    return ClassificationMetrics(
        top1=(predicted == labels).double().mean().item(),
        top5=top5.double().mean().item(),
        per_class_accuracy=per_class,
        confusion_matrix=confusion,
        class_names=names,
        num_samples=count,
    )


def confusion_matrix_figure(confusion: torch.Tensor, class_names: Sequence[str], path: str | Path, *,
                            normalize: bool = True, dpi: int = 100) -> Path:
    """Write the (K, K) confusion matrix as a PNG heatmap, true classes down, predictions across; with
    ``normalize`` each row is divided by its count (the cell is the share of that class predicted so).
    Counts are written in the cells up to 30 classes. Returns ``path``."""
    # Imported here, not at the top: only figure writers need matplotlib, and `import vit` stays light for
    # training workers. The Agg canvas draws off-screen, with no display and no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_classes = len(class_names)
    if tuple(confusion.shape) != (num_classes, num_classes):
        raise ValueError(f"confusion matrix {tuple(confusion.shape)} does not fit {num_classes} class names")
    counts = confusion.double()
    shown = counts / counts.sum(dim=1, keepdim=True).clamp_min(1) if normalize else counts
    side = min(4.0 + 0.35 * num_classes, 30.0)
    fig = Figure(figsize=(side + 1.5, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shown.numpy(), cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalize else "samples")
    ax.set_xticks(range(num_classes), labels=class_names, rotation=90)
    ax.set_yticks(range(num_classes), labels=class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if num_classes <= 30:
        threshold = 0.5 * float(shown.max())
        for row in range(num_classes):
            for col in range(num_classes):
                ax.text(col, row, str(int(confusion[row, col])), ha="center", va="center", fontsize=7,
                        color="white" if float(shown[row, col]) > threshold else "black")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=dpi)
    return path
