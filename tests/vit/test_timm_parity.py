"""Numerical parity with timm's VisionTransformer: same weights, same outputs (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vit import (
    VisionTransformer,
    ViTConfig,
    decode_variant,
    from_timm_state_dict,
    resample_pos_embed,
    to_timm_state_dict,
)


def timm_model(config: ViTConfig) -> TimmViT:
    return TimmViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        num_classes=config.num_classes,
        global_pool=config.pool,
        fc_norm=False,  # vitflow normalises the tokens, then pools (Eq. 4; big_vision's GAP head)
    ).eval()


CASES = [
    decode_variant("Ti/4", image_size=32, num_classes=10, depth=3),
    decode_variant("Ti/8", image_size=(32, 64), num_classes=17, depth=2),
    decode_variant("S/16", image_size=64, num_classes=100, depth=2),
    decode_variant("Ti/16", image_size=48, num_classes=5, depth=2, pool="avg"),
    decode_variant("B/16", image_size=32, num_classes=3, depth=1),
]


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c.variant}@{c.image_size}-{c.pool}")
def test_timm_weights_give_timm_outputs(config):
    torch.manual_seed(0)
    theirs = timm_model(config)
    with torch.no_grad():  # timm zero-initialises some tensors; randomise everything so nothing hides
        for tensor in theirs.state_dict().values():
            tensor.normal_(0, 0.05)
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(from_timm_state_dict(theirs.state_dict(), config))
    x = torch.randn(4, 3, *config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", CASES[:3], ids=lambda c: f"{c.variant}@{c.image_size}")
def test_vitflow_weights_load_into_timm(config):
    ours = VisionTransformer(config).eval()
    theirs = timm_model(config)
    theirs.load_state_dict(to_timm_state_dict(ours))
    x = torch.randn(2, 3, *config.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "old_grid, new_grid",
    [((8, 8), (12, 12)), ((8, 8), (4, 4)), ((4, 8), (6, 10)), ((14, 14), (24, 24))],
)
def test_position_resampling_matches_timm(old_grid, new_grid):
    pos = torch.randn(1, 1 + old_grid[0] * old_grid[1], 16)
    ours = resample_pos_embed(pos, new_grid, old_grid)
    theirs = resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=1)
    assert ours.shape == (1, 1 + new_grid[0] * new_grid[1], 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[:, 0], pos[:, 0])  # the [class] token's embedding is kept


@pytest.mark.parametrize("new_size", [48, 64, (32, 48)])
def test_resolution_change_matches_timm(new_size):
    """Weights trained at 32 px, fine-tuned at a higher resolution: both libraries resample the same way."""
    torch.manual_seed(0)
    source = decode_variant("Ti/4", image_size=32, num_classes=10, depth=2)
    target = source.replace(image_size=new_size)
    pretrained = timm_model(source).state_dict()
    theirs = timm_model(target)
    adapted = dict(pretrained)
    adapted["pos_embed"] = resample_abs_pos_embed(pretrained["pos_embed"], new_size=list(target.grid_size), num_prefix_tokens=1)
    theirs.load_state_dict(adapted)
    ours = VisionTransformer(target).eval()
    ours.load_state_dict(from_timm_state_dict(pretrained, target))
    x = torch.randn(2, 3, *target.image_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_unsupported_timm_layouts_are_named():
    config = decode_variant("Ti/8", image_size=32, num_classes=10, depth=1)
    with_registers = TimmViT(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=10, reg_tokens=4)
    with pytest.raises(ValueError, match="reg_token"):
        from_timm_state_dict(with_registers.state_dict(), config)
    no_class_slot = TimmViT(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=10, no_embed_class=True)
    with pytest.raises(ValueError, match="no_embed_class"):
        from_timm_state_dict(no_class_slot.state_dict(), config)


def test_non_square_timm_weights_at_another_size_need_their_size():
    source = decode_variant("Ti/8", image_size=(32, 64), num_classes=10, depth=1)
    target = source.replace(image_size=64)
    weights = timm_model(source).state_dict()
    with pytest.raises(ValueError, match="pass source_image_size"):
        from_timm_state_dict(weights, target)
    adapted = from_timm_state_dict(weights, target, source_image_size=(32, 64))
    assert adapted["pos_embed"].shape == (1, 1 + 64, 192)
