"""fit / evaluate on CPU with a tiny ViT: learning, reporting, checkpoints, exact resume, gradient
accumulation, precisions, divergence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.checkpoint import CHECKPOINT_FILE, load_checkpoint
from vit.data import DataConfig, eval_loader, train_loader
from vit.loop import NonFiniteLossError, TrainConfig, evaluate, fit, steps_within
from vit.optim import OptimConfig, warmup_cosine

from tests.objectstore import free_port


def tiny_model(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    fields = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    fields.update(overrides)
    return VisionTransformer(ViTConfig(**fields))


class Recorder:
    """A ``report`` callable that keeps every call."""

    def __init__(self):
        self.calls: list[tuple[int, dict, str | None]] = []

    def __call__(self, step, metrics, checkpoint_dir=None):
        self.calls.append((step, dict(metrics), checkpoint_dir))

    def steps(self, key: str) -> list[int]:
        return [step for step, metrics, _ in self.calls if key in metrics]


class TensorData:
    """In-memory ``EpochData``: a fixed per-epoch permutation, so runs with different batch sizes see the
    same sample order."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int):
        self.images, self.targets, self.batch_size = images, targets, batch_size
        self.batches_per_epoch = len(images) // batch_size

    def epoch(self, epoch: int, start_batch: int = 0):
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(epoch))
        for index in range(start_batch, self.batches_per_epoch):
            chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
            yield self.images[chosen], self.targets[chosen]

    def __iter__(self):
        return self.epoch(0)


def random_data(count: int = 32, batch_size: int = 4) -> TensorData:
    generator = torch.Generator().manual_seed(1)
    return TensorData(torch.randn(count, 3, 32, 32, generator=generator),
                      torch.randint(0, 10, (count,), generator=generator), batch_size)


def data_config(**overrides) -> DataConfig:
    fields = dict(batch_size=16, num_workers=0, shuffle_buffer=32, image_size=32, crop_scale=(0.6, 1.0),
                  crop_pct=1.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    fields.update(overrides)
    return DataConfig(**fields)


def test_loss_goes_down_on_cifar_shards(cifar):
    train = train_loader(cifar, data_config(), rank=0, world_size=1)
    val = eval_loader(cifar, data_config(), rank=0, world_size=1)
    report = Recorder()
    config = TrainConfig(total_steps=48, log_every=8, eval_every=24,
                         optim=OptimConfig(lr=3e-3, weight_decay=0.01, warmup_steps=4))
    final = fit(tiny_model(), train, val, config, report=report)
    losses = [m["train/loss"] for _, m, _ in report.calls if "train/loss" in m]
    assert losses[-1] < 0.9 * losses[0], losses  # 2.28 -> 1.98 when written
    assert report.steps("val/top1") == [24, 48] and final["val/num_samples"] == 32
    assert 0 <= final["val/top1"] <= final["val/top5"] <= 1


def test_reports_at_log_eval_and_checkpoint_steps(tmp_path):
    report = Recorder()
    config = TrainConfig(total_steps=8, log_every=2, eval_every=4, checkpoint_every=5)
    fit(tiny_model(), random_data(), random_data(8), config, report=report, checkpoint_dir=tmp_path)
    assert [step for step, _, _ in report.calls] == [2, 4, 5, 6, 8]
    assert report.steps("train/loss") == [2, 4, 6, 8] and report.steps("val/top1") == [4, 8]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_sec", "train/epoch"} <= set(report.calls[0][1])
    checkpoints = {step: directory for step, _, directory in report.calls if directory}
    assert checkpoints == {5: str(tmp_path / "step-000005"), 8: str(tmp_path / "step-000008")}
    state = torch.load(tmp_path / "step-000005" / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 5 and (state["epoch"], state["batch_in_epoch"]) == (0, 5)
    assert ViTConfig.from_dict(state["model_config"]).embed_dim == 32
    assert TrainConfig.from_dict(state["train_config"]) == config
    assert isinstance(state["rng"]["torch"], torch.Tensor)


def test_resume_ends_at_total_steps_with_the_same_weights(cifar, tmp_path):
    """Dropout and augmentation are on: the RNG state, data position and schedule all have to resume."""
    data = data_config(batch_size=8, mixup_alpha=0.5, randaugment=True)
    config = TrainConfig(total_steps=11, grad_accum_steps=2, checkpoint_every=3, log_every=7, label_smoothing=0.1,
                         optim=OptimConfig(lr=2e-3, warmup_steps=3))
    model_config = dict(dropout=0.1, drop_path=0.1)

    def run(directory, resume_from=None, seed=0):
        report = Recorder()
        model = tiny_model(seed, **model_config)
        fit(model, train_loader(cifar, data, rank=0, world_size=1), None, config, report=report,
            checkpoint_dir=directory, resume_from=resume_from)
        return model, report

    full, _ = run(tmp_path / "full")
    # 128 samples / 8 = 16 batches an epoch, 2 per step: step 9 is batch 2 of epoch 1.
    midway = load_checkpoint(tmp_path / "full" / "step-000009")
    assert (midway["epoch"], midway["batch_in_epoch"]) == (1, 2)
    resumed, report = run(tmp_path / "resumed", resume_from=tmp_path / "full" / "step-000009", seed=123)
    assert [step for step, _, _ in report.calls] == [11]
    assert report.calls[-1][2] == str(tmp_path / "resumed" / "step-000011")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_a_run_resumed_with_more_steps_trains_on_to_them_on_the_new_schedule(tmp_path):
    first = TrainConfig(total_steps=4, log_every=2, optim=OptimConfig(lr=1e-3, warmup_steps=1))
    fit(tiny_model(), random_data(), None, first, report=Recorder(), checkpoint_dir=tmp_path / "first")
    longer = TrainConfig(total_steps=8, log_every=2, optim=OptimConfig(lr=1e-3, warmup_steps=1, min_lr_ratio=0.5))
    report = Recorder()
    fit(tiny_model(), random_data(), None, longer, report=report, resume_from=tmp_path / "first" / "step-000004")
    assert report.steps("train/loss") == [6, 8]
    lrs = [metrics["train/lr"] for _, metrics, _ in report.calls]
    expected = [1e-3 * warmup_cosine(s, warmup_steps=1, total_steps=8, min_lr_ratio=0.5) for s in (5, 7)]
    assert lrs == pytest.approx(expected, rel=1e-12)  # the cosine over 8 steps to half the peak, not the first's


def test_gradient_accumulation_matches_a_larger_batch():
    config = dict(total_steps=3, log_every=3, precision="fp32", optim=OptimConfig(lr=1e-3, grad_clip_norm=None))
    small, large = tiny_model(), tiny_model()
    fit(small, random_data(batch_size=4), None, TrainConfig(grad_accum_steps=2, **config), report=Recorder())
    fit(large, random_data(batch_size=8), None, TrainConfig(grad_accum_steps=1, **config), report=Recorder())
    for (name, a), b in zip(small.state_dict().items(), large.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_runs_on_cpu():
    report = Recorder()
    fit(tiny_model(), random_data(), random_data(8), TrainConfig(total_steps=2, log_every=1, precision="bf16"),
        report=report)
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for _, m, _ in report.calls)
    assert "val/top1" in report.calls[-1][1]


def test_fp16_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match="fp16.*CUDA.*bf16"):
        fit(tiny_model(), random_data(), None, TrainConfig(total_steps=1, precision="fp16"), report=Recorder())


def test_nan_loss_is_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 1"):
        fit(model, random_data(), None, TrainConfig(total_steps=3), report=Recorder())


def test_a_diverging_run_stops_at_the_first_non_finite_gradient_even_with_a_finite_loss():
    # SGD at lr 1e30: the weights overflow after one step; the loss stays a finite ~1e30 for a while
    # but the gradient norm is no longer finite. Training must stop there, not run its budget out.
    report = Recorder()
    config = TrainConfig(total_steps=20, log_every=1, optim=OptimConfig(optimizer="sgd", lr=1e30, momentum=0.9,
                                                                      weight_decay=0.0, grad_clip_norm=1.0))
    with pytest.raises(NonFiniteLossError, match="(gradient norm|loss) is (nan|inf)"):
        fit(tiny_model(), random_data(), None, config, report=report)
    assert max((step for step, _, _ in report.calls), default=0) < 5


def test_evaluate_sums_through_the_injected_all_reduce():
    model, data = tiny_model(), random_data(12, batch_size=5)
    batches = [(data.images[:5], data.targets[:5]), (data.images[5:12], data.targets[5:12])]
    whole = evaluate(model, batches)
    halves = [evaluate(model, [b], all_reduce=lambda t: t) for b in batches]
    shares = iter([torch.tensor([h[k] * h["num_samples"] for k in ("loss", "top1", "top5")] + [h["num_samples"]],
                                dtype=torch.float64) for h in halves])
    first = next(shares)
    combined = evaluate(model, batches[1:], all_reduce=lambda t: t + first)
    assert whole["num_samples"] == combined["num_samples"] == 12
    for key in ("loss", "top1", "top5"):
        assert combined[key] == pytest.approx(whole[key])


def test_train_config_is_checked_early():
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(total_steps=1, precision="fp8")
    for budget in (0, -5.0, True, "60"):
        with pytest.raises(ValueError, match=f"time_budget_s must be a number of seconds > 0 or None, got {budget!r}"):
            TrainConfig(total_steps=1, time_budget_s=budget)
    with pytest.raises(ValueError, match="unknown TrainConfig keys: steps"):
        TrainConfig.from_dict({"steps": 3})
    config = TrainConfig(total_steps=5, optim=OptimConfig(optimizer="sgd"))
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.slow
def test_compiled_training_runs():
    report = Recorder()
    fit(tiny_model(), random_data(), None, TrainConfig(total_steps=2, log_every=1, compile=True), report=report)
    assert report.steps("train/loss") == [1, 2]


class FakeClock:
    """A clock that moves only when told: ``fit(clock=...)`` reads every time from it, so a time budget's
    decisions are exact here, whatever the load on the machine."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ClockedData(TensorData):
    """``random_data`` whose every batch takes ``seconds`` of ``clock``'s time (a function of the batch's
    number when given one: a machine that slows down)."""

    def __init__(self, clock: FakeClock, seconds, count: int = 32, batch_size: int = 4):
        data = random_data(count, batch_size)
        super().__init__(data.images, data.targets, batch_size)
        self.clock, self.seconds, self.served = clock, seconds, 0

    def epoch(self, epoch: int, start_batch: int = 0):
        for batch in super().epoch(epoch, start_batch):
            self.served += 1
            self.clock.now += self.seconds(self.served) if callable(self.seconds) else self.seconds
            yield batch


def test_steps_within_a_budget():
    # 96 s after the final evaluation's 4, at 0.5 s of training and 0.1 s of evaluations per step
    assert steps_within(100.0, train_s_per_step=0.5, pause_s_per_step=0.1, final_s=4.0) == 160
    assert steps_within(3.0, train_s_per_step=0.5, pause_s_per_step=0.0, final_s=4.0) == 0  # none fits: stop now
    assert steps_within(-1.0, train_s_per_step=0.5, pause_s_per_step=0.0, final_s=0.0) == 0  # overrun
    with pytest.raises(ValueError, match="a step must take some time"):
        steps_within(10.0, train_s_per_step=0.0, pause_s_per_step=0.0, final_s=0.0)


BUDGET = 3.0  # seconds of a FakeClock; a step takes 20 ms of it (an evaluation 20 ms more): about 145 steps fit


def budgeted(**changes) -> TrainConfig:
    fields = dict(total_steps=10_000, log_every=2, eval_every=20, checkpoint_every=20, time_budget_s=BUDGET,
                  optim=OptimConfig(lr=1e-3, warmup_steps=5, min_lr_ratio=0.1))
    fields.update(changes)
    return TrainConfig(**fields)


def test_a_time_budget_ends_the_run_on_the_clock_with_its_schedule_at_the_floor(tmp_path):
    clock, report = FakeClock(), Recorder()
    fit(tiny_model(), ClockedData(clock, 0.02), ClockedData(clock, 0.01, count=8), budgeted(), report=report,
        checkpoint_dir=tmp_path, clock=clock)
    last = report.calls[-1]
    planned = [metrics["train/planned_steps"] for _, metrics, _ in report.calls if "train/planned_steps" in metrics]
    assert last[1]["train/planned_steps"] == last[0] and 130 < last[0] < 150, planned  # ended where it planned to
    assert planned[0] < 10_000 and "val/top1" in last[1] and last[2] is not None  # evaluated, checkpointed
    state = load_checkpoint(last[2])
    assert BUDGET - 0.05 <= state["time_budget_used_s"] <= BUDGET + 1e-9 and clock.now <= BUDGET + 1e-9  # not overrun
    # the cosine was fitted to the steps taken: it ends on the last one at its floor (over its 10,000 steps
    # it would still be at its peak)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.1)
    assert state["schedule"]["lr_lambdas"][0]["total_steps"] == last[0]


def test_a_run_that_slows_down_still_ends_inside_its_budget():
    # Each batch slower than the last: 20 ms at first, 40 ms by batch 100 (the 60-minute benchmark's
    # training slowed by 18% in an hour on the AMX Xeon). The plan follows within a few log windows.
    clock, report = FakeClock(), Recorder()
    fit(tiny_model(), ClockedData(clock, lambda n: 0.02 * (1 + n / 100)), None, budgeted(log_every=5),
        report=report, clock=clock)
    planned = [metrics["train/planned_steps"] for _, metrics, _ in report.calls if "train/planned_steps" in metrics]
    assert planned[-1] == report.calls[-1][0] and planned[1] > planned[-1]  # the plan shrank as the steps slowed
    assert BUDGET - 0.3 <= clock.now <= BUDGET + 0.1, (clock.now, planned)  # at most a few steps over


def test_a_budgeted_run_resumes_with_what_was_left_of_its_budget(tmp_path):
    def fail_at_6(step, metrics, checkpoint_dir=None):
        if step == 6:  # after its checkpoint: a worker lost there
            raise RuntimeError("drill: lost at step 6")

    clock = FakeClock()
    with pytest.raises(RuntimeError, match="drill"):
        fit(tiny_model(), ClockedData(clock, 0.02), None, budgeted(checkpoint_every=2), report=fail_at_6,
            checkpoint_dir=tmp_path / "first", clock=clock)
    midway = tmp_path / "first" / "step-000006"
    used = load_checkpoint(midway)["time_budget_used_s"]
    assert used == pytest.approx(6 * 0.02)
    clock.now += 100.0  # the time until the resume is not the run's
    report = Recorder()
    fit(tiny_model(), ClockedData(clock, 0.02), None, budgeted(checkpoint_every=2), report=report,
        checkpoint_dir=tmp_path / "resumed", resume_from=midway, clock=clock)
    left = [metrics["train/budget_left_s"] for _, metrics, _ in report.calls if "train/budget_left_s" in metrics]
    assert report.calls[0][0] == 8 and left[0] == pytest.approx(BUDGET - 8 * 0.02)  # its clock went on from `used`
    last = report.calls[-1]
    assert last[1]["train/planned_steps"] == last[0] and 140 < last[0] <= 150
    final = load_checkpoint(last[2])
    assert BUDGET - 0.05 <= final["time_budget_used_s"] <= BUDGET + 1e-9
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.1)  # the floor, at the end
    # resumed once more from its last checkpoint (the plan's end: it ended on its budget), it does nothing
    again = Recorder()
    assert fit(tiny_model(), ClockedData(clock, 0.02), None, budgeted(), report=again, resume_from=last[2],
               clock=clock) == {}
    assert again.calls == []


def _budgeted_rank(rank: int, world_size: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        report, clock = Recorder(), FakeClock()
        # rank 1 is three times slower: the ranks plan on their mean, and end at the same step
        fit(tiny_model(), ClockedData(clock, 0.01 * (1 + 2 * rank)), None, budgeted(checkpoint_every=0),
            report=report, rank=rank, clock=clock)
        steps = [(step, metrics.get("train/planned_steps")) for step, metrics, _ in report.calls]
        Path(out, f"rank{rank}.json").write_text(json.dumps(steps))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_where_a_budgeted_run_ends(tmp_path):
    port = free_port()
    torch.multiprocessing.spawn(_budgeted_rank, args=(2, port, str(tmp_path)), nprocs=2)
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # on their mean step time (20 ms): about 150 steps, where rank 0 alone would plan 300 and rank 1 100
    assert zero == one and zero[-1][0] == zero[-1][1] and 130 < zero[-1][0] < 160, (zero, one)
