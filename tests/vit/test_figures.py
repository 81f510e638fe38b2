"""The paper's Figure 6/7 views: the attention-map accessor is the real forward's, and each view's numbers
match a direct computation on a tiny model or a hand-made attention pattern."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from vit import VisionTransformer, ViTConfig
from vit.figures import (
    attention_distance_from_maps,
    attention_rollout,
    mean_attention_distance,
    patch_distances,
    patch_embedding_components,
    position_embedding_similarity,
    rollout_from_maps,
    write_attention_rollout_figure,
    write_vit_figures,
)

CONFIG = ViTConfig(image_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                   dropout=0.2, drop_path=0.2)  # regularised, so eval mode matters


@pytest.fixture(scope="module")
def model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(CONFIG)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- the accessor ----------------------------------------------------------------------------------


def test_attention_maps_are_row_stochastic_and_restore_the_mode(model, images):
    model.train()
    maps = model.attention_maps(images)
    assert model.training
    assert len(maps) == CONFIG.depth
    for attn in maps:
        assert attn.shape == (3, CONFIG.num_heads, 17, 17)
        assert (attn >= 0).all()
        torch.testing.assert_close(attn.sum(dim=-1), torch.ones(3, CONFIG.num_heads, 17))


def test_attention_maps_reproduce_the_forward(model, images):
    """Rebuild every block's output from its map (attention output = maps @ v) and compare with the normal
    forward: the maps are the ones the model uses."""
    model.eval()
    maps = model.attention_maps(images)
    with torch.no_grad():
        x = torch.cat([model.cls_token.expand(3, -1, -1), model.patch_embed(images)], dim=1) + model.pos_embed
        for block, attn in zip(model.blocks, maps):
            batch, tokens, dim = x.shape
            qkv = block.attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, CONFIG.num_heads, -1).permute(2, 0, 3, 1, 4)
            mixed = (attn @ qkv[2]).transpose(1, 2).reshape(batch, tokens, dim)  # (B, T, D)
            rebuilt = x + block.attn.proj(mixed)
            rebuilt = rebuilt + block.mlp(block.norm2(rebuilt))
            expected = block(x)  # SDPA on the CPU in fp32: a different kernel than the written-out maps
            torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)
            x = expected
        torch.testing.assert_close(model.norm(x), model.forward_features(images))


# --- Figure 7, left ---------------------------------------------------------------------------------


def test_patch_embedding_components_are_orthonormal_pcs(model):
    pcs = patch_embedding_components(model, num_components=28)
    assert pcs.components.shape == (28, 3, 4, 4) and pcs.explained_variance_ratio.shape == (28,)
    flat = pcs.components.reshape(28, -1).double()
    torch.testing.assert_close(flat @ flat.T, torch.eye(28, dtype=torch.float64), atol=1e-5, rtol=0)
    ratios = pcs.explained_variance_ratio
    assert (ratios[:-1] >= ratios[1:]).all() and 0 < ratios.sum() <= 1 + 1e-6
    # Directly: eigenvectors of the filters' covariance, largest eigenvalue first, up to sign.
    filters = model.patch_embed.proj.weight.detach().double().reshape(CONFIG.embed_dim, -1)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(filters.T))  # ascending
    top = eigenvectors.flip(1)[:, :28].T  # (28, C*P*P)
    torch.testing.assert_close((flat * top).sum(dim=1).abs(), torch.ones(28, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(ratios.double(), eigenvalues.flip(0)[:28] / eigenvalues.sum(), atol=1e-5, rtol=0)
    assert patch_embedding_components(model, num_components=100).components.shape[0] == 32  # rank <= D


# --- Figure 7, center -------------------------------------------------------------------------------


def test_position_similarity(model):
    similarity = position_embedding_similarity(model)
    assert similarity.shape == (4, 4, 4, 4)
    flat = similarity.reshape(16, 16)
    torch.testing.assert_close(flat.diagonal(), torch.ones(16))
    torch.testing.assert_close(flat, flat.T)
    pos = model.pos_embed.detach()[0, 1:]  # patch (1, 2) is token 1 + 6, patch (3, 0) token 1 + 12
    direct = torch.nn.functional.cosine_similarity(pos[6], pos[12], dim=0)
    torch.testing.assert_close(similarity[1, 2, 3, 0], direct)


# --- Figure 7, right --------------------------------------------------------------------------------


def test_patch_distances_on_a_two_by_two_grid():
    d = patch_distances((2, 2), patch_size=4)
    side, diagonal = 4.0, 4.0 * math.sqrt(2)
    expected = torch.tensor([[0, side, side, diagonal], [side, 0, diagonal, side],
                             [side, diagonal, 0, side], [diagonal, side, side, 0]], dtype=torch.float64)
    torch.testing.assert_close(d, expected)


def test_attention_distance_of_hand_made_patterns():
    """A 2 x 2 grid of 4-pixel patches: T = 5 tokens, the [class] token first."""
    eye = torch.zeros(1, 1, 5, 5)
    eye[0, 0] = torch.eye(5)  # every query attends to itself
    uniform = torch.full((1, 1, 5, 5), 1 / 5)  # every query attends everywhere
    half_to_class = torch.zeros(1, 1, 5, 5)  # half to [class], half to the patch to the right / left
    half_to_class[0, 0, :, 0] = 0.5
    for query, key in [(1, 2), (2, 1), (3, 4), (4, 3)]:
        half_to_class[0, 0, query, key] = 0.5
    half_to_class[0, 0, 0, 1] = 0.5
    maps = [torch.cat([eye, uniform, half_to_class], dim=1)]  # one block, three heads
    distances = attention_distance_from_maps(maps, (2, 2), patch_size=4)
    side, diagonal = 4.0, 4.0 * math.sqrt(2)
    # uniform: each query averages 0, side, side, diagonal; half_to_class: renormalised, one side away
    assert distances.shape == (1, 3)
    assert distances[0].tolist() == pytest.approx([0.0, (2 * side + diagonal) / 4, side])


def test_mean_attention_distance_of_a_model(model, images):
    distances = mean_attention_distance(model, images)
    assert distances.shape == (CONFIG.depth, CONFIG.num_heads)
    torch.testing.assert_close(distances, attention_distance_from_maps(model.attention_maps(images), (4, 4), 4))
    assert ((distances > 0) & (distances < 12 * math.sqrt(2))).all()  # within the grid's span


# --- Figure 6 ---------------------------------------------------------------------------------------


def test_rollout_of_identity_and_uniform_attention():
    identity = [torch.eye(17).expand(2, 3, 17, 17)] * 4
    torch.testing.assert_close(rollout_from_maps(identity, (4, 4)), torch.zeros(2, 4, 4))  # nothing leaves [class]
    uniform = [torch.full((2, 3, 17, 17), 1 / 17)] * 4
    rolled = rollout_from_maps(uniform, (4, 4))
    torch.testing.assert_close(rolled, torch.full_like(rolled, rolled[0, 0, 0].item()))  # every patch alike
    assert 0 < rolled[0].sum() < 1  # the rest stays on the [class] token


def test_rollout_matches_a_direct_product():
    generator = torch.Generator().manual_seed(2)
    maps = [torch.rand(2, 3, 17, 17, generator=generator).softmax(dim=-1) for _ in range(3)]
    # Abnar & Zuidema's form: 0.5 * W_att + 0.5 * I per layer (equal to "add I, renormalise" for
    # row-stochastic W_att), multiplied from the first layer up.
    joint = torch.eye(17).double().expand(2, 17, 17)
    for attn in maps:
        joint = (0.5 * attn.double().mean(dim=1) + 0.5 * torch.eye(17).double()) @ joint
    torch.testing.assert_close(rollout_from_maps(maps, (4, 4)), joint[:, 0, 1:].reshape(2, 4, 4).float())


def test_attention_rollout_of_a_model(model, images):
    rolled = attention_rollout(model, images)
    assert rolled.shape == (3, 4, 4)
    assert (rolled > 0).all() and (rolled.sum(dim=(1, 2)) < 1).all()


# --- the PNGs ---------------------------------------------------------------------------------------


def test_every_figure_writes_a_png_of_the_expected_size(model, images, tmp_path):
    """Through write_vit_figures, which calls each writer on its view's numbers."""
    paths = write_vit_figures(model, images, tmp_path / "figures", rollout_images=2)
    sizes = {  # figsize * dpi (100): nothing is cropped
        "patch_embedding_pcs": (int(100 * 1.2 * 7), int(100 * (1.2 * 4 + 0.6))),  # 28 components, 7 columns
        "position_similarity": (650, 550),
        "attention_distance": (500, 400),
        "attention_rollout": (2 * 200, 430),  # two images
    }
    assert sorted(paths) == sorted(sizes)
    for name, path in paths.items():
        assert path == tmp_path / "figures" / f"{name}.png"
        assert png_size(path) == sizes[name], name
        assert path.stat().st_size > 5_000, name
    grey = write_attention_rollout_figure(images[:1, :1], attention_rollout(model, images[:1]),
                                     tmp_path / "grey.png")  # one channel: drawn grey
    assert png_size(grey) == (200, 430)
