"""predict / classification_metrics / confusion_matrix_figure against hand-built and directly computed
numbers."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.evaluation import classification_metrics, confusion_matrix_figure, predict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def logits_ranking(*orders: list[int]) -> torch.Tensor:
    """One row per order: the classes from best to worst scored."""
    rows = torch.zeros(len(orders), len(orders[0]))
    for row, order in enumerate(orders):
        for rank, cls in enumerate(order):
            rows[row, cls] = -float(rank)
    return rows


def test_metrics_on_a_hand_built_set():
    logits = logits_ranking(
        [0, 1, 2, 3, 4, 5],  # true 0: right
        [1, 0, 2, 3, 4, 5],  # true 0: predicted 1, second guess right (top-5 hit)
        [1, 2, 0, 3, 4, 5],  # true 1: right
        [0, 1, 3, 4, 5, 2],  # true 2: predicted 0, true class ranked last (top-5 miss)
        [2, 0, 1, 3, 4, 5],  # true 2: right
        [3, 0, 1, 2, 4, 5],  # true 3: right; classes 4 and 5 never occur
    )
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    metrics = classification_metrics(logits, labels, class_names=list("abcdef"))
    assert metrics.top1 == pytest.approx(4 / 6) and metrics.top5 == pytest.approx(5 / 6)
    assert metrics.num_samples == 6 and metrics.class_names == tuple("abcdef")
    expected = torch.zeros(6, 6, dtype=torch.int64)
    for true, pred in [(0, 0), (0, 1), (1, 1), (2, 0), (2, 2), (3, 3)]:
        expected[true, pred] += 1
    assert metrics.confusion_matrix.dtype == torch.int64
    assert torch.equal(metrics.confusion_matrix, expected)
    assert metrics.per_class_accuracy[:4].tolist() == [0.5, 1.0, 0.5, 1.0]
    assert math.isnan(metrics.per_class_accuracy[4]) and math.isnan(metrics.per_class_accuracy[5])
    as_dict = metrics.to_dict()
    assert as_dict["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5, "d": 1.0, "e": None, "f": None}
    assert as_dict["confusion_matrix"][0] == [1, 1, 0, 0, 0, 0]


def test_metrics_match_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 12, generator=generator), torch.randint(0, 12, (200,), generator=generator)
    metrics = classification_metrics(logits, labels)
    confusion = [[0] * 12 for _ in range(12)]
    top5_hits = 0
    for row, label in zip(logits.tolist(), labels.tolist()):
        ranked = sorted(range(12), key=lambda k: -row[k])
        confusion[label][ranked[0]] += 1
        top5_hits += label in ranked[:5]
    assert metrics.confusion_matrix.tolist() == confusion
    assert metrics.top1 == pytest.approx(sum(confusion[k][k] for k in range(12)) / 200)
    assert metrics.top5 == pytest.approx(top5_hits / 200)
    assert metrics.per_class_accuracy.tolist() == pytest.approx([confusion[k][k] / sum(confusion[k]) for k in range(12)])
    assert metrics.class_names == tuple(str(k) for k in range(12))


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="expected logits"):
        classification_metrics(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        classification_metrics(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        classification_metrics(torch.zeros(2, 4), torch.tensor([0, 1]), class_names=["a", "b", "c"])


def test_predict_concatenates_every_batch_in_eval_mode():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                        num_classes=5, dropout=0.5))
    images = torch.randn(7, 3, 16, 16)
    hard = torch.randint(0, 5, (4,))
    soft = torch.nn.functional.one_hot(torch.randint(0, 5, (3,)), 5).float() * 0.8 + 0.04  # (3, 5)
    model.train()
    logits, labels = predict(model, [(images[:4], hard), (images[4:], soft)])
    assert model.training  # put back as it was
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images))
    assert logits.shape == (7, 5) and labels.dtype == torch.int64
    assert labels.tolist() == hard.tolist() + soft.argmax(dim=1).tolist()
    with pytest.raises(ValueError, match="no batches"):
        predict(model, [])


def test_confusion_matrix_png(tmp_path):
    confusion = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    path = confusion_matrix_figure(confusion, ["cat", "dog", "bird"], tmp_path / "confusion.png")
    assert png_size(path) == (int(100 * (4 + 0.35 * 3 + 1.5)), int(100 * (4 + 0.35 * 3)))
    assert path.stat().st_size > 5_000
    with pytest.raises(ValueError, match="does not fit"):
        confusion_matrix_figure(confusion, ["cat", "dog"], tmp_path / "bad.png")
