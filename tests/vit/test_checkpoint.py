"""Moving pre-trained weights to a new resolution and a new task."""

from __future__ import annotations

import pytest
import torch

from vit import (
    VisionTransformer,
    ViTConfig,
    adapt_state_dict,
    load_pretrained,
    resample_pos_embed,
)


def tiny(**overrides) -> ViTConfig:
    fields = dict(image_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    fields.update(overrides)
    return ViTConfig(**fields)


def test_load_pretrained_at_a_higher_resolution_with_a_new_zero_head():
    source = tiny()
    pretrained = VisionTransformer(source)
    target = source.replace(image_size=48, num_classes=17)
    model = load_pretrained(pretrained.state_dict(), source, target)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, 32)
    assert torch.equal(model.pos_embed[:, 0], pretrained.pos_embed[:, 0])
    assert model.head.weight.shape == (17, 32) and not model.head.weight.any() and not model.head.bias.any()
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, pretrained.blocks[1].mlp.fc2.weight)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 17)


def test_same_size_same_classes_is_the_identity():
    config = tiny()
    state = VisionTransformer(config).state_dict()
    adapted = adapt_state_dict(state, config, config)
    assert all(torch.equal(adapted[k], state[k]) for k in state)


def test_interpolation_preserves_a_smooth_field():
    """A position embedding that is a linear function of the grid coordinates stays (nearly) linear."""
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    field = torch.stack([rows, cols], dim=-1).reshape(1, 16, 2)
    pos = torch.cat([torch.full((1, 1, 2), 7.0), field], dim=1)
    out = resample_pos_embed(pos, (8, 8), mode="bilinear", antialias=False)[0, 1:].reshape(8, 8, 2)
    assert torch.all(out[1:, :, 0] >= out[:-1, :, 0]) and torch.all(out[:, 1:, 1] >= out[:, :-1, 1])
    assert out[..., 0].min() >= 0 and out[..., 0].max() <= 3


def test_sincos_embeddings_are_recomputed_not_interpolated():
    source = tiny(pos_embed="sincos")
    target = source.replace(image_size=48)
    adapted = adapt_state_dict(VisionTransformer(source).state_dict(), source, target)
    torch.testing.assert_close(adapted["pos_embed"], VisionTransformer(target).pos_embed.detach())


def test_non_square_grids_need_the_old_grid():
    pos = torch.randn(1, 1 + 4 * 8, 8)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(pos, (6, 6))
    with pytest.raises(ValueError, match="does not hold"):
        resample_pos_embed(pos, (6, 6), old_grid=(4, 4))
    assert resample_pos_embed(pos, (6, 12), old_grid=(4, 8)).shape == (1, 73, 8)


def test_architecture_changes_are_refused():
    with pytest.raises(ValueError, match="embed_dim: 32 != 64"):
        adapt_state_dict(VisionTransformer(tiny()).state_dict(), tiny(), tiny(embed_dim=64))
    with pytest.raises(ValueError, match="patch_size: 8 != 4"):
        adapt_state_dict(VisionTransformer(tiny()).state_dict(), tiny(), tiny(patch_size=4))


def test_a_truncated_weights_file_is_named_not_a_crash(tmp_path):
    """A checkpoint cut short (a copy still being written, a full disk) raises EOFError with no message
    inside torch.load: the error names the file and says what is wrong."""
    from vit.checkpoint import load_weights_only

    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.ones(64)}, whole)
    for size in (0, 1, 7):
        cut = tmp_path / f"cut-{size}.pt"
        cut.write_bytes(whole.read_bytes()[:size])
        with pytest.raises(ValueError, match=rf"cut-{size}\.pt: (not a readable PyTorch weights file|refused to load)"):
            load_weights_only(cut)
    assert torch.equal(load_weights_only(whole)["w"], torch.ones(64))


def test_model_from_checkpoint_rebuilds_the_trained_model(tmp_path):
    """From a checkpoint folder, its file, a loaded checkpoint or bare weights with their config: the same
    weights, strictly loaded, in eval mode."""
    from tests.vit.test_loop import Recorder, random_data, tiny_model
    from vit.checkpoint import CHECKPOINT_FILE, load_checkpoint, model_from_checkpoint
    from vit.loop import TrainConfig, fit

    trained = tiny_model()
    fit(trained, random_data(), None, TrainConfig(total_steps=2), report=Recorder(), checkpoint_dir=tmp_path)
    folder = tmp_path / "step-000002"
    for source in (folder, folder / CHECKPOINT_FILE, load_checkpoint(folder)):
        model = model_from_checkpoint(source)
        assert model.config == trained.config and not model.training
        for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    bare = model_from_checkpoint(trained.state_dict(), trained.config)
    assert torch.equal(bare.head.weight, trained.head.weight) and not bare.training


def test_model_from_checkpoint_names_what_it_refuses(tmp_path):
    from vit.checkpoint import model_from_checkpoint

    weights = tmp_path / "weights.pt"
    torch.save(VisionTransformer(tiny()).state_dict(), weights)
    with pytest.raises(ValueError, match=r"weights\.pt: not a vitflow-checkpoint v1 checkpoint"):
        model_from_checkpoint(weights)
    with pytest.raises(ValueError, match="bare weights need their config"):
        model_from_checkpoint(VisionTransformer(tiny()).state_dict())
    with pytest.raises(ValueError, match="do not fit the model of its config"):
        model_from_checkpoint(VisionTransformer(tiny()).state_dict(), tiny(embed_dim=64))
