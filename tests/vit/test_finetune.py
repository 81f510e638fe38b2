"""The fine-tuning recipe: zero head, resampled position embeddings, the paper's optimiser, the linear probe
under ``fit``, and layer-wise lr decay."""

from __future__ import annotations

import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.checkpoint import resample_pos_embed
from vit.finetune import FinetuneConfig, paper_finetune_optim, prepare_finetune_model
from vit.loop import TrainConfig, fit
from vit.optim import OptimConfig, build_optimizer, build_schedule, layer_decay_groups

SOURCE = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                   dropout=0.1, drop_path=0.1)


def pretrained_state(config: ViTConfig = SOURCE) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = VisionTransformer(config)
    with torch.no_grad():
        model.head.weight.normal_()  # a visibly non-zero pre-trained head
    return model.state_dict()


class TensorData:
    """In-memory ``EpochData`` for ``fit``: the same fixed batches every epoch."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int):
        self.batches = list(zip(images.split(batch_size), targets.split(batch_size)))
        self.batches_per_epoch = len(self.batches)

    def epoch(self, epoch: int, start_batch: int = 0):
        return iter(self.batches[start_batch:])


@pytest.mark.parametrize("num_classes", [5, 10])  # 10: the class count is unchanged, the head still goes
@pytest.mark.parametrize("mode", ["full", "linear_probe"])
def test_zero_head_and_position_embeddings_on_the_new_grid(num_classes, mode):
    state = pretrained_state()
    model = prepare_finetune_model(state, SOURCE, image_size=24, num_classes=num_classes, mode=mode)
    assert model.head.weight.shape == (num_classes, 32)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.config.grid_size == (6, 6)
    assert model.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(model.pos_embed.detach(), resample_pos_embed(state["pos_embed"], (6, 6), (4, 4)))
    for name in ("cls_token", "patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "norm.weight"):
        torch.testing.assert_close(model.state_dict()[name], state[name])
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, num_classes)


def test_full_mode_trains_everything_with_the_source_regularisation():
    model = prepare_finetune_model(pretrained_state(), SOURCE, image_size=16, num_classes=3)
    assert all(p.requires_grad for p in model.parameters())
    assert (model.config.dropout, model.config.drop_path) == (0.1, 0.1)


def test_linear_probe_under_fit_changes_only_the_head():
    model = prepare_finetune_model(pretrained_state(), SOURCE, image_size=16, num_classes=3, mode="linear_probe")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    optimizer = build_optimizer(model, paper_finetune_optim())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(model.head.weight), id(model.head.bias)}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    data = TensorData(torch.randn(12, 3, 16, 16), torch.randint(0, 3, (12,)), batch_size=4)
    config = TrainConfig(total_steps=4, optim=paper_finetune_optim(lr=0.1, warmup_steps=1), log_every=1)
    fit(model, data, None, config, report=lambda *args, **kwargs: None)
    for name, param in model.named_parameters():
        if name.startswith("head."):
            assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_linear_probe_backbone_is_deterministic_in_train_mode():
    """fit calls model.train(); the probe's frozen backbone must still compute its eval-mode function."""
    model = prepare_finetune_model(pretrained_state(), SOURCE, image_size=16, num_classes=3, mode="linear_probe")
    images = torch.randn(3, 3, 16, 16)
    model.eval()
    expected = model.forward_features(images)
    model.train()
    torch.testing.assert_close(model.forward_features(images), expected, rtol=0, atol=0)


def test_paper_optimiser_defaults_and_overrides():
    optim = FinetuneConfig().optim
    assert (optim.optimizer, optim.momentum, optim.weight_decay, optim.grad_clip_norm, optim.min_lr_ratio) \
        == ("sgd", 0.9, 0.0, 1.0, 0.0)
    adamw = paper_finetune_optim(3e-4, warmup_steps=10, optimizer="adamw", layer_decay=0.75)
    assert (adamw.optimizer, adamw.lr, adamw.warmup_steps, adamw.layer_decay) == ("adamw", 3e-4, 10, 0.75)


def test_finetune_config_validates_and_round_trips():
    config = FinetuneConfig(image_size=48, mode="linear_probe", optim=paper_finetune_optim(0.03))
    assert FinetuneConfig.from_dict(config.to_dict()) == config
    assert config.replace(image_size=64).image_size == 64
    with pytest.raises(ValueError, match="unknown FinetuneConfig keys: lr"):
        FinetuneConfig.from_dict({"lr": 0.1})
    with pytest.raises(ValueError, match="mode must be one of"):
        FinetuneConfig(mode="probe")
    with pytest.raises(ValueError, match="image_size must be a positive integer"):
        FinetuneConfig(image_size=0)
    with pytest.raises(ValueError, match="layer_decay has no effect"):
        FinetuneConfig(mode="linear_probe", optim=paper_finetune_optim(layer_decay=0.5))
    with pytest.raises(ValueError, match="unknown OptimConfig keys"):
        FinetuneConfig.from_dict({"optim": {"learning_rate": 0.1}})
    with pytest.raises(ValueError, match="num_classes >= 1"):
        prepare_finetune_model(pretrained_state(), SOURCE, image_size=16, num_classes=0)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        prepare_finetune_model(pretrained_state(), SOURCE, image_size=18, num_classes=3)


def test_layer_decay_gives_each_layer_its_own_lr_and_the_schedule_scales_each():
    model = VisionTransformer(SOURCE)  # depth 2: embeddings 0, blocks 1 and 2, norm and head 3
    config = OptimConfig(optimizer="sgd", lr=1.0, weight_decay=0.1, layer_decay=0.5, warmup_steps=2)
    optimizer = build_optimizer(model, config)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert sorted(lr_of) == sorted(names.values())  # every parameter, once
    expected = {"patch_embed.proj.weight": 0.125, "pos_embed": 0.125, "cls_token": 0.125,
                "blocks.0.attn.qkv.weight": 0.25, "blocks.0.norm1.bias": 0.25, "blocks.1.mlp.fc1.weight": 0.5,
                "norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    assert {n: lr_of[n] for n in expected} == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == config.lr  # the head first: fit logs the peak lr
    decay_of = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of["blocks.0.attn.qkv.weight"] == 0.1 and decay_of["blocks.0.attn.qkv.bias"] == 0.0
    assert decay_of["pos_embed"] == 0.0

    schedule = build_schedule(optimizer, config, total_steps=10)  # warmup: step 0 at half of each base lr
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5 * g["lr_scale"] for g in optimizer.param_groups])
    optimizer.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["lr_scale"] for g in optimizer.param_groups])


def test_layer_decay_groups_skip_frozen_parameters_and_validate():
    model = prepare_finetune_model(pretrained_state(), SOURCE, image_size=16, num_classes=3, mode="linear_probe")
    groups = layer_decay_groups(model, 0.0, 0.5)
    assert [(g["layer"], g["lr_scale"], len(g["params"])) for g in groups] == [(3, 1.0, 1), (3, 1.0, 1)]
    with pytest.raises(ValueError, match="layer_decay must be in"):
        OptimConfig(layer_decay=1.5)
    assert OptimConfig.from_dict(OptimConfig(layer_decay=0.65).to_dict()).layer_decay == 0.65
