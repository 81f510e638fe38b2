"""Parameter groups, the warmup + cosine schedule and its checkpointing."""

from __future__ import annotations

import io
import math

import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.optim import (
    OptimConfig,
    WarmupCosine,
    build_optimizer,
    build_schedule,
    param_groups,
    warmup_cosine,
)


def tiny_model(**overrides) -> VisionTransformer:
    fields = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    fields.update(overrides)
    return VisionTransformer(ViTConfig(**fields))


def group_names(model, groups) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}


def test_no_weight_decay_on_norms_biases_pos_embed_and_cls_token():
    model = tiny_model()
    groups = group_names(model, param_groups(model, 0.1))
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias", "blocks.0.norm1.weight",
            "blocks.1.attn.qkv.bias"} <= groups["no_decay"]
    assert groups["decay"] == {n for n, p in model.named_parameters() if p.ndim > 1} - {"pos_embed", "cls_token"}
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight"} \
        <= groups["decay"]
    assert all(p.ndim > 1 for n, p in model.named_parameters() if n in groups["decay"])
    assert groups["decay"] | groups["no_decay"] == {n for n, _ in model.named_parameters()}


def test_frozen_sincos_position_embeddings_are_left_out():
    model = tiny_model(pos_embed="sincos")
    groups = group_names(model, param_groups(model, 0.1))
    assert "pos_embed" not in groups["decay"] | groups["no_decay"]


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer(name, cls):
    optimizer = build_optimizer(tiny_model(), OptimConfig(optimizer=name, lr=0.01, weight_decay=0.1))
    assert isinstance(optimizer, cls)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    if name == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.9


def test_warmup_then_cosine_to_the_floor():
    factors = [warmup_cosine(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(15)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and math.isclose(factors[9], 0.55) and math.isclose(factors[14], 0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))


def test_schedule_state_round_trips_through_weights_only_load():
    config = OptimConfig(lr=0.1, warmup_steps=3, min_lr_ratio=0.0)
    model = tiny_model()
    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, config, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    first = build_schedule(build_optimizer(model, config), config, total_steps=10)
    for _ in range(5):
        first.optimizer.step()
        first.step()
    buffer = io.BytesIO()
    torch.save({"optimizer": first.optimizer.state_dict(), "schedule": first.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    optimizer2 = build_optimizer(model, config)
    schedule2 = build_schedule(optimizer2, config, total_steps=10)
    optimizer2.load_state_dict(state["optimizer"])
    schedule2.load_state_dict(state["schedule"])
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(lrs[5])
    assert lrs[0] == pytest.approx(0.1 / 3) and lrs[2] == pytest.approx(0.1)


def test_config_is_checked_early():
    with pytest.raises(ValueError, match="optimizer must be"):
        OptimConfig(optimizer="adam")
    with pytest.raises(ValueError, match="unknown OptimConfig keys: learning_rate"):
        OptimConfig.from_dict({"learning_rate": 1.0})
    assert OptimConfig.from_dict(OptimConfig().to_dict()) == OptimConfig()
    with pytest.raises(ValueError, match="warmup_steps 5 exceed"):
        build_schedule(build_optimizer(tiny_model(), OptimConfig(warmup_steps=5)), OptimConfig(warmup_steps=5), 4)


def test_a_replanned_schedule_goes_on_from_where_it_was_and_ends_at_its_floor():
    plan = WarmupCosine(warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert [plan(s) for s in range(101)] == [warmup_cosine(s, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
                                             for s in range(101)]
    before = plan(40)
    plan.replan(40, 70)  # the budget allows 30 more steps, not 60
    assert plan(40) == pytest.approx(before, rel=1e-12) and plan(70) == pytest.approx(0.1)
    factors = [plan(s) for s in range(40, 71)]
    assert all(a > b for a, b in zip(factors, factors[1:]))  # still falling, now faster
    assert plan(71) == pytest.approx(0.1)  # past the end: at the floor
    plan.replan(50, 120)  # and longer again: continuous, and the floor at the new end
    assert plan(120) == pytest.approx(0.1) and plan(50) == pytest.approx(factors[10], rel=1e-12)
    with pytest.raises(ValueError, match="cannot end the schedule at step 49: 50 steps are already taken"):
        plan.replan(50, 49)


def test_a_replan_inside_the_warm_up_keeps_the_warm_up():
    plan = WarmupCosine(warmup_steps=10, total_steps=100, min_lr_ratio=0.0)
    plan.replan(5, 30)
    assert [plan(s) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert plan(10) == 1.0 and plan(30) == pytest.approx(0.0, abs=1e-12)


def test_a_replanned_schedule_resumes_from_its_state_dict():
    config = OptimConfig(lr=0.1, warmup_steps=2, min_lr_ratio=0.0)
    model = tiny_model()
    schedule = build_schedule(build_optimizer(model, config), config, total_steps=20)
    for _ in range(8):
        schedule.optimizer.step()
        schedule.step()
    schedule.lr_lambdas[0].replan(8, 12)
    buffer = io.BytesIO()
    torch.save(schedule.state_dict(), buffer)
    buffer.seek(0)
    restored = build_schedule(build_optimizer(model, config), config, total_steps=20)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.lr_lambdas[0] == schedule.lr_lambdas[0]  # the plan: its end and its anchor
    for _ in range(4):
        schedule.optimizer.step(), schedule.step()
        restored.optimizer.step(), restored.step()
        assert restored.optimizer.param_groups[0]["lr"] == schedule.optimizer.param_groups[0]["lr"]
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # step 12: the end
