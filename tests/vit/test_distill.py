"""Knowledge distillation (vit.distill): the soft and hard losses against a hand computation, the teacher
frozen, in eval mode and at its own resolution, and in ``fit`` on real shards: the loss a run reports is the
distillation loss of its batch, soft targets (MixUp) work, a resumed run ends bit for bit where an
uninterrupted one does, and the mistakes are named."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.vit.test_loop import Recorder, data_config, tiny_model
from vit.checkpoint import load_checkpoint
from vit.data import train_loader
from vit.distill import DistillConfig, Teacher, distillation_loss
from vit.loop import TrainConfig, fit
from vit.optim import OptimConfig


def test_the_soft_loss_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [1.0, -1.0, 2.0]])
    labels = torch.tensor([0, 2])
    config = DistillConfig(teacher="models:/t/1", kind="soft", alpha=0.3, temperature=2.0)
    ce = sum(-math.log(math.exp(s[y]) / sum(math.exp(v) for v in s)) for s, y in zip(student.tolist(), labels.tolist())) / 2
    kl = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(v / 2) / sum(math.exp(w / 2) for w in t) for v in t]
        q = [math.exp(v / 2) / sum(math.exp(w / 2) for w in s) for v in s]
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = 0.7 * ce + 0.3 * 4.0 * kl / 2  # T^2 = 4, batch mean
    assert distillation_loss(student, teacher, labels, config).item() == pytest.approx(expected, rel=1e-6)


def test_the_hard_loss_is_cross_entropy_with_the_teachers_argmax():
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    config = DistillConfig(teacher="t", kind="hard", alpha=0.5)
    expected = 0.5 * F.cross_entropy(student, labels, label_smoothing=0.1) + 0.5 * F.cross_entropy(student, teacher.argmax(1))
    torch.testing.assert_close(distillation_loss(student, teacher, labels, config, label_smoothing=0.1), expected)
    # alpha 0: the labels alone; alpha 1: the teacher alone. MixUp's soft targets are taken as they are.
    soft_targets = torch.softmax(torch.randn(6, 5), dim=1)
    only_labels = DistillConfig(teacher="t", alpha=0.0)
    torch.testing.assert_close(distillation_loss(student, teacher, soft_targets, only_labels),
                               F.cross_entropy(student, soft_targets))
    only_teacher = DistillConfig(teacher="t", alpha=1.0)
    torch.testing.assert_close(distillation_loss(student, teacher, soft_targets, only_teacher),
                               F.cross_entropy(student, teacher.argmax(1)))
    with pytest.raises(ValueError, match=r"teacher's logits \(6, 4\) do not match the student's \(6, 5\)"):
        distillation_loss(student, torch.randn(6, 4), labels, config)


def test_distill_config_is_checked():
    for fields, message in (({"teacher": ""}, "teacher must name a model"), ({"teacher": "t", "kind": "kl"}, "kind must be"),
                            ({"teacher": "t", "alpha": 1.5}, "alpha must be in"),
                            ({"teacher": "t", "kind": "soft", "temperature": 0}, "temperature must be > 0"),
                            ({"teacher": "t", "temperature": 4.0}, "temperature applies to kind 'soft' only")):
        with pytest.raises(ValueError, match=message):
            DistillConfig(**fields)
    with pytest.raises(ValueError, match="unknown DistillConfig keys: tau"):
        DistillConfig.from_dict({"teacher": "t", "tau": 2})
    config = TrainConfig(total_steps=2, distill={"teacher": "models:/t@champion", "kind": "soft", "temperature": 3.0})
    assert config.distill == DistillConfig(teacher="models:/t@champion", kind="soft", temperature=3.0)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_the_teacher_is_frozen_in_eval_mode_and_sees_its_own_resolution():
    model = tiny_model(1, image_size=48, dropout=0.5)  # dropout: eval mode shows as a deterministic output
    teacher = Teacher(model, image_size=(48, 48))
    teacher.train()
    assert not teacher.training and not model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    images = torch.randn(3, 3, 32, 32, requires_grad=True)
    logits = teacher(images)
    assert logits.shape == (3, 10) and not logits.requires_grad
    resized = F.interpolate(images.detach(), size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(logits, model(resized), rtol=0, atol=0)
    torch.testing.assert_close(teacher(images), logits, rtol=0, atol=0)  # deterministic: dropout is off


def test_fit_reports_the_distillation_loss_of_its_batch(cifar):
    """One step, fp32: the reported loss is exactly distillation_loss(student, teacher at 48 px) on batch 0."""
    data = data_config(batch_size=8, mixup_alpha=0.4)  # soft targets reach the loss as they are
    distill = DistillConfig(teacher="a 48 px model", kind="soft", alpha=0.7, temperature=2.0)
    config = TrainConfig(total_steps=1, log_every=1, precision="fp32", label_smoothing=0.1, distill=distill,
                         optim=OptimConfig(lr=1e-3))
    teacher = Teacher(tiny_model(7, image_size=48), image_size=(48, 48))
    student = tiny_model(3)
    before = tiny_model(3)
    loader = train_loader(cifar, data, rank=0, world_size=1)
    report = Recorder()
    fit(student, loader, None, config, report=report, teacher=teacher)
    images, targets, _ = next(iter(loader.epoch(0)))
    assert targets.ndim == 2  # MixUp's soft targets
    expected = distillation_loss(before(images), teacher(images), targets, distill, label_smoothing=0.1)
    assert report.calls[0][1]["train/loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(student.head.weight, before.head.weight)  # and the student stepped


def test_a_resumed_distillation_run_ends_bit_for_bit_where_an_uninterrupted_one_does(cifar, tmp_path):
    data = data_config(batch_size=8)
    config = TrainConfig(total_steps=6, checkpoint_every=3, log_every=3, distill=DistillConfig(teacher="t", alpha=0.5),
                         optim=OptimConfig(lr=2e-3, warmup_steps=1))

    def run(directory, resume_from=None, seed=0):
        teacher = Teacher(tiny_model(11, image_size=40, patch_size=8), image_size=(40, 40))
        fit(tiny_model(seed, dropout=0.1), train_loader(cifar, data, rank=0, world_size=1), None, config,
            report=Recorder(), checkpoint_dir=directory, resume_from=resume_from, teacher=teacher)

    run(tmp_path / "full")
    run(tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000003", seed=99)
    full, resumed = (load_checkpoint(tmp_path / name / "step-000006") for name in ("full", "resumed"))
    assert not any(key.startswith("model.") or "teacher" in key for key in full["model"])  # the teacher is not saved
    for key, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)
    assert full["train_config"]["distill"] == {"teacher": "t", "kind": "hard", "alpha": 0.5, "temperature": 1.0}


def test_a_teacher_and_train_distill_come_together(cifar):
    data = data_config(batch_size=8)
    loader = train_loader(cifar, data, rank=0, world_size=1)
    with pytest.raises(ValueError, match="train.distill needs a teacher"):
        fit(tiny_model(), loader, None, TrainConfig(total_steps=1, distill={"teacher": "t"}), report=Recorder())
    with pytest.raises(ValueError, match="a teacher needs train.distill"):
        fit(tiny_model(), loader, None, TrainConfig(total_steps=1), report=Recorder(),
            teacher=Teacher(tiny_model(), image_size=(32, 32)))
