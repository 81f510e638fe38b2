"""Weight EMA (vit.ema): the average and its warm-up against a hand computation; in ``fit`` on real shards,
evaluated beside the weights, checkpointed, resumed bit for bit, and read back as a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.vit.test_loop import Recorder, data_config, tiny_model
from vit.checkpoint import load_checkpoint, model_from_checkpoint
from vit.data import eval_loader, train_loader
from vit.ema import EmaConfig, WeightEMA, better_weights, decay_at, ema_weights
from vit.loop import TrainConfig, fit
from vit.optim import OptimConfig


def test_the_average_follows_the_warm_up_rule_by_hand():
    model = nn.Linear(2, 1, bias=False)
    for warmup, decays in ((True, [0.1, 2 / 11, 3 / 12]), (False, [0.9, 0.9, 0.9])):
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema = WeightEMA(model, EmaConfig(decay=0.9, warmup=warmup))
        ema.update(model)  # the first update copies the weights
        expected = torch.ones(1, 2)
        for n, value in enumerate((3.0, -2.0, 5.0)):
            with torch.no_grad():
                model.weight.fill_(value)
            ema.update(model)
            assert decay_at(ema.config, n) == pytest.approx(decays[n])
            expected = decays[n] * expected + (1 - decays[n]) * value
            torch.testing.assert_close(ema.module.weight, expected)
        assert ema.num_updates == 4
        assert model.weight.requires_grad and not any(p.grad is not None for p in ema.module.parameters())


def test_ema_config_is_checked():
    for bad in (0, 1, 1.5, -0.1, True, "0.99"):
        with pytest.raises(ValueError, match="decay must be in"):
            EmaConfig(decay=bad)
    with pytest.raises(ValueError, match="unknown EmaConfig keys: every"):
        EmaConfig.from_dict({"decay": 0.99, "every": 2})
    assert TrainConfig(total_steps=2, ema={"decay": 0.99}).ema == EmaConfig(decay=0.99)
    assert TrainConfig(total_steps=2, ema={"decay": 0.99}).to_dict()["ema"] == {"decay": 0.99, "warmup": True}


def test_fit_evaluates_the_ema_beside_the_weights_and_checkpoints_it(cifar, tmp_path):
    config = TrainConfig(total_steps=12, log_every=6, eval_every=6, checkpoint_every=6, ema=EmaConfig(decay=0.9),
                         optim=OptimConfig(lr=3e-3, warmup_steps=2))
    report = Recorder()
    model = tiny_model()
    data = data_config()
    final = fit(model, train_loader(cifar, data, rank=0, world_size=1), eval_loader(cifar, data, rank=0, world_size=1),
                config, report=report, checkpoint_dir=tmp_path)
    assert report.steps("val_ema/top1") == report.steps("val/top1") == [6, 12]
    assert {"val_ema/loss", "val_ema/top1", "val_ema/top5"} <= set(final)

    state = load_checkpoint(tmp_path / "step-000012")
    assert int(state["ema"]["n_averaged"]) == 12  # one update a step
    averaged = model_from_checkpoint(tmp_path / "step-000012", weights="ema")
    trained = model_from_checkpoint(tmp_path / "step-000012")
    for key, value in ema_weights(state["ema"]).items():
        torch.testing.assert_close(averaged.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(averaged.head.weight, trained.head.weight)  # an average, not the last weights
    # The metrics it reported are the EMA model's own.
    from vit.loop import evaluate

    # In the precision the run used (bf16 where the CPU has it: "auto"), which the checkpoint records.
    direct = evaluate(averaged, eval_loader(cifar, data, rank=0, world_size=1), precision=state["precision"])
    assert final["val_ema/top1"] == pytest.approx(direct["top1"]) and final["val_ema/loss"] == pytest.approx(direct["loss"])


def test_a_resumed_run_ends_with_the_same_ema_bit_for_bit(cifar, tmp_path):
    data = data_config(batch_size=8, mixup_alpha=0.5)
    config = TrainConfig(total_steps=10, checkpoint_every=4, log_every=5, ema=EmaConfig(decay=0.95),
                         optim=OptimConfig(lr=2e-3, warmup_steps=2))

    def run(directory, resume_from=None, seed=0):
        model = tiny_model(seed, dropout=0.1)
        fit(model, train_loader(cifar, data, rank=0, world_size=1), None, config, report=Recorder(),
            checkpoint_dir=directory, resume_from=resume_from)

    run(tmp_path / "full")
    run(tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000004", seed=123)
    full, resumed = (load_checkpoint(tmp_path / name / "step-000010")["ema"] for name in ("full", "resumed"))
    assert full.keys() == resumed.keys() and int(resumed["n_averaged"]) == 10
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)


def test_a_checkpoint_without_an_ema_does_not_resume_a_run_with_one(cifar, tmp_path):
    data = data_config()
    plain = TrainConfig(total_steps=2, checkpoint_every=2, log_every=2)
    fit(tiny_model(), train_loader(cifar, data, rank=0, world_size=1), None, plain, report=Recorder(),
        checkpoint_dir=tmp_path / "plain")
    with_ema = TrainConfig(total_steps=4, log_every=2, ema=EmaConfig(decay=0.9))
    with pytest.raises(ValueError, match=r"step-000002: the run keeps a weight EMA \(train.ema\) but this checkpoint"):
        fit(tiny_model(), train_loader(cifar, data, rank=0, world_size=1), None, with_ema, report=Recorder(),
            resume_from=tmp_path / "plain" / "step-000002")
    with pytest.raises(ValueError, match="holds no weight EMA"):
        model_from_checkpoint(tmp_path / "plain" / "step-000002", weights="ema")


def test_the_better_weights_on_validation_are_chosen():
    assert better_weights({"val/top1": 0.5, "val_ema/top1": 0.6}) == "ema"
    assert better_weights({"val/top1": 0.6, "val_ema/top1": 0.5}) == "raw"
    assert better_weights({"val/top1": 0.5, "val_ema/top1": 0.5, "val/loss": 1.0, "val_ema/loss": 0.9}) == "ema"
    assert better_weights({"val/top1": 0.5, "val_ema/top1": 0.5, "val/loss": 0.9, "val_ema/loss": 0.9}) == "raw"
    assert better_weights({"val/top1": 0.5}) == "raw"  # no EMA kept
