"""Contract tests over the whole variant table, plus the model's behaviour."""

from __future__ import annotations

import io

import pytest
import torch

from vit import VARIANTS, VisionTransformer, ViTConfig, decode_variant


def tiny(**overrides) -> ViTConfig:
    fields = dict(image_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=2, num_heads=2)
    fields.update(overrides)
    return ViTConfig(**fields)


@pytest.mark.parametrize(
    "name, dim, depth, heads",
    [("Ti/16", 192, 12, 3), ("S/16", 384, 12, 6), ("B/16", 768, 12, 12), ("L/16", 1024, 24, 16), ("H/14", 1280, 32, 16)],
)
def test_decode_variant_follows_the_paper_table(name, dim, depth, heads):
    config = decode_variant(name)
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_dim) == (dim, depth, heads, 4 * dim)
    assert config.patch_size == int(name.split("/")[1])
    assert config.variant == name


@pytest.mark.parametrize("size", list(VARIANTS))
def test_every_variant_matches_timm_parameter_count(size):
    """Built on the meta device, so even H/14 costs no memory."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    config = decode_variant(f"{size}/16", image_size=224, num_classes=1000)
    with torch.device("meta"):
        ours = VisionTransformer(config)
        theirs = TimmViT(img_size=224, patch_size=16, embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours_shapes == theirs_shapes


def test_known_parameter_counts():
    """The paper's Table 1 sizes (with a 1000-class head)."""
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in VisionTransformer(decode_variant(name, num_classes=1000)).parameters()) for name in ("B/16", "L/16")}
    assert counts == {"B/16": 86_567_656, "L/16": 304_326_632}


def test_small_image_variant_and_overrides():
    config = decode_variant("ti/4", image_size=32, num_classes=10, depth=6)
    assert (config.variant, config.grid_size, config.num_patches, config.depth) == ("Ti/4", (8, 8), 64, 6)
    logits = VisionTransformer(config)(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=30, patch_size=8), "not divisible by patch_size 8"),
        (dict(image_size=(32, 36), patch_size=8), "32x36 is not divisible"),
        (dict(embed_dim=30, num_heads=4), "embed_dim 30 is not divisible by num_heads 4"),
        (dict(depth=0), "depth must be a positive integer"),
        (dict(num_classes=-1), "num_classes must be an integer >= 0"),
        (dict(dropout=1.5), "dropout must be in [0, 1)"),
        (dict(pos_embed="rope"), "pos_embed must be 'learned' or 'sincos'"),
        (dict(pool="max"), "pool must be 'token' or 'avg'"),
        (dict(pos_embed="sincos", embed_dim=34, num_heads=2), "divisible by 4"),
    ],
)
def test_invalid_configs_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tiny(**kwargs)


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        ViTConfig(224, 16)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        tiny().depth = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", ["B16", "X/16", "B/", "/16", ""])
def test_bad_variant_names(name):
    with pytest.raises(ValueError, match="variant|model size"):
        decode_variant(name)


def test_config_dict_round_trip_and_unknown_keys():
    config = tiny(image_size=(32, 48), pos_embed="sincos", pool="avg")
    assert ViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ViTConfig keys: hidden_size"):
        ViTConfig.from_dict({**config.to_dict(), "hidden_size": 3})


def test_shapes_through_the_interface():
    config = tiny(image_size=(32, 48))
    model = VisionTransformer(config)
    x = torch.randn(3, 3, 32, 48)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + 4 * 6, 32)
    assert model.forward_head(tokens, pre_logits=True).shape == (3, 32)
    assert torch.equal(model.forward_head(tokens), model(x))
    with pytest.raises(ValueError, match="does not match the model's patch grid"):
        model(torch.randn(1, 3, 32, 32))


def test_avg_pool_averages_patch_tokens():
    model = VisionTransformer(tiny(pool="avg")).eval()
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))


def test_reset_head_installs_a_zero_head():
    model = VisionTransformer(tiny())
    model.reset_head(7)
    assert model.config.num_classes == 7
    assert model.head.weight.shape == (7, 32)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert not model(torch.randn(2, 3, 32, 32)).any()  # zero logits until fine-tuning moves the head
    model.reset_head(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def test_sincos_position_embeddings_are_fixed():
    model = VisionTransformer(tiny(pos_embed="sincos"))
    assert not model.pos_embed.requires_grad
    assert not model.pos_embed[0, 0].any()  # no position for the [class] token
    assert torch.unique(model.pos_embed[0, 1:], dim=0).shape[0] == 16  # every patch position distinct
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.pos_embed.grad is None


def test_every_trainable_parameter_gets_a_gradient():
    model = VisionTransformer(tiny(drop_path=0.1, dropout=0.1, attn_dropout=0.1))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dropout_and_stochastic_depth_only_in_training():
    model = VisionTransformer(tiny(drop_path=0.5, dropout=0.2))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    assert [round(block.drop_path_prob, 3) for block in model.blocks] == [0.0, 0.5]


def test_state_dict_loads_with_weights_only():
    model = VisionTransformer(tiny())
    buffer = io.BytesIO()
    torch.save({"config": model.config.to_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    clone = VisionTransformer(ViTConfig.from_dict(loaded["config"]))
    clone.load_state_dict(loaded["model"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_patch_embedding_equals_a_strided_convolution():
    """Eq. 1's linear projection of flattened patches is the strided convolution timm applies."""
    model = VisionTransformer(tiny(image_size=(32, 48)))
    x = torch.randn(2, 3, 32, 48)
    conv = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
    torch.testing.assert_close(model.patch_embed(x), conv, rtol=1e-5, atol=1e-5)


def test_written_out_attention_equals_sdpa():
    from vit.model import attention

    q, k, v = torch.randn(3, 2, 4, 17, 8).unbind(0)
    torch.testing.assert_close(attention(q, k, v, 0.0, fused=False), attention(q, k, v, 0.0, fused=True), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_on_cpu_trains():
    model = VisionTransformer(tiny())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_a_seed_alone_decides_the_initial_weights_and_leaves_the_global_random_state_alone():
    before = torch.random.get_rng_state()
    first, again, other = (VisionTransformer(tiny(), seed=seed).state_dict() for seed in (7, 7, 8))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(first[name], again[name]) for name in first)
    drawn = [name for name in first if not torch.equal(first[name], other[name])]
    # every randomly initialised tensor differs between seeds (the rest are constants: zeros, ones)
    assert {name for name in first if first[name].std() > 0 and name.endswith("weight") and "norm" not in name} <= set(drawn)
    assert "pos_embed" in drawn and "cls_token" in drawn
    torch.manual_seed(0)
    unseeded = VisionTransformer(tiny()).state_dict()
    assert not torch.equal(torch.random.get_rng_state(), before)  # without a seed: drawn from the global state
    assert any(not torch.equal(unseeded[name], first[name]) for name in first)
