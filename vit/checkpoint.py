"""State-dict adaptation: moving a pre-trained ViT to a new resolution or a new task, and timm's layout.

Fine-tuning at a higher resolution keeps the patch size, so the sequence gets longer and the learned
position embeddings no longer fit. The paper (Section 3.2) resamples them by 2D interpolation over the
patch grid; the [class] token's embedding has no grid position and is kept as is.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vit.config import ViTConfig
from vit.model import VisionTransformer, sincos_pos_embed_2d

NUM_PREFIX_TOKENS = 1  # the [class] token

# timm keys vitflow's ViT has no counterpart for: a clear error beats a silent drop.
_UNSUPPORTED_TIMM_KEYS = ("reg_token", "fc_norm.weight", "attn_pool", "norm_pre.weight", "pre_logits")


def load_weights_only(file: str | Path) -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU, its refusals as a ``ValueError`` naming the file.

    Checkpoints and downloaded weights may come from anywhere: only tensors and primitive containers
    load; a file that needs any other pickled object (a ``__reduce__`` that would run code) is refused
    before anything in it runs. Never fall back to ``weights_only=False``.
    """
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a page long and suggests weights_only=False: keep only what it found.
        text = str(error)
        needs = re.search(r"GLOBAL ([\w.]+)", text)  # an object (a callable) the file would build
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        if needs:
            what, reason = "it holds more than tensors", f"Unsupported global: GLOBAL {needs.group(1)}"
        else:  # e.g. an opcode outside plain containers, or a file cut inside its pickle
            what, reason = "it is not a weights-only pickle", found.group(1).strip() if found else _first_line(error)
        raise ValueError(f"{file}: refused to load: {what} ({reason}); weights are loaded "
                         "with weights_only=True, so no pickled object or code in it was run") from None
    except (RuntimeError, EOFError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{file}: not a readable PyTorch weights file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    """The first line of an error's message; its kind when it has none (an ``EOFError`` from a truncated
    file says nothing)."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0]
    return "the file ends early: truncated or still being written" if isinstance(error, EOFError) else type(error).__name__


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = NUM_PREFIX_TOKENS,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """(1, prefix + old_rows * old_cols, D) -> (1, prefix + new_rows * new_cols, D).

    ``old_grid`` may be left out for a square grid; a non-square one must be given.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"position embeddings must have shape (1, T, D), got {tuple(pos_embed.shape)}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    num_old = grid.shape[1]
    if old_grid is None:
        side = math.isqrt(num_old)
        if side * side != num_old:
            raise ValueError(f"{num_old} position embeddings are not a square grid; pass old_grid=(rows, cols)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_old:
        raise ValueError(f"old_grid {old_grid} does not hold the {num_old} patch position embeddings")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, rows, cols)
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)  # (1, N', D)
    return torch.cat([prefix, grid], dim=1)


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor], source: ViTConfig, target: ViTConfig
) -> dict[str, torch.Tensor]:
    """Adapt weights trained with ``source`` so they load into a model built from ``target``.

    - A new image size: learned position embeddings are 2D-interpolated to the new patch grid; sin-cos
      ones are recomputed for it.
    - A different number of classes: the head is dropped; call ``reset_head`` (zero-initialised) after
      loading with ``strict=False``, or use :func:`load_pretrained`, which does both.
    Architecture changes (width, depth, heads, patch size) cannot be adapted and raise ``ValueError``.
    """
    fixed = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "pos_embed")
    mismatched = [f"{name}: {getattr(source, name)} != {getattr(target, name)}" for name in fixed if getattr(source, name) != getattr(target, name)]
    if mismatched:
        raise ValueError("cannot adapt weights across architectures (" + "; ".join(mismatched) + ")")
    adapted = dict(state_dict)
    if source.grid_size != target.grid_size:
        if target.pos_embed == "learned":
            adapted["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], target.grid_size, source.grid_size)
        else:
            pos = torch.zeros(1, 1 + target.num_patches, target.embed_dim, dtype=state_dict["pos_embed"].dtype)
            pos[0, 1:] = sincos_pos_embed_2d(target.grid_size, target.embed_dim)
            adapted["pos_embed"] = pos
    if source.num_classes != target.num_classes:
        adapted.pop("head.weight", None)
        adapted.pop("head.bias", None)
    return adapted


def load_pretrained(
    state_dict: Mapping[str, torch.Tensor], source: ViTConfig, target: ViTConfig
) -> VisionTransformer:
    """Build a ``target`` model from ``source`` weights: resampled position embeddings, and a
    zero-initialised head when the number of classes changes (the paper's fine-tuning recipe)."""
    model = VisionTransformer(target)
    adapted = adapt_state_dict(state_dict, source, target)
    missing, unexpected = model.load_state_dict(adapted, strict=False)
    head_keys = {"head.weight", "head.bias"} if target.num_classes > 0 else set()
    if unexpected or set(missing) - head_keys:
        raise ValueError(f"weights do not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    if missing:
        model.reset_head(target.num_classes)
    return model


def from_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    target: ViTConfig,
    source_image_size: int | tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """A timm ``VisionTransformer`` state dict -> vitflow's, adapted to ``target`` (image size, classes).

    vitflow uses timm's parameter names, so the work is checking that the layouts agree and resampling
    position embeddings (timm stores them for the [class] token plus the grid, as vitflow does). The
    weights' own image size is inferred when their grid is the target's or square; otherwise give
    ``source_image_size``.
    """
    unsupported = sorted(k for k in state_dict if k.startswith(_UNSUPPORTED_TIMM_KEYS))
    if unsupported:
        raise ValueError(f"timm weights with features vitflow's ViT does not have: {unsupported}")
    if "cls_token" not in state_dict or "pos_embed" not in state_dict:
        raise ValueError("timm weights without a [class] token or absolute position embeddings are not supported")
    pos_len = state_dict["pos_embed"].shape[1]
    if math.isqrt(pos_len) ** 2 == pos_len:  # a square grid and no slot for the [class] token (1 + n^2 is never square)
        raise ValueError("timm weights with no position embedding for the [class] token (no_embed_class) are not supported")
    grid_tokens = pos_len - NUM_PREFIX_TOKENS
    if source_image_size is None:
        side = math.isqrt(grid_tokens)
        if grid_tokens == target.num_patches:
            source_image_size = target.image_size
        elif side * side == grid_tokens:
            source_image_size = side * target.patch_size
        else:
            raise ValueError(
                f"cannot infer the image size of timm weights with {grid_tokens} position embeddings "
                "(not a square grid); pass source_image_size"
            )
    head = state_dict.get("head.weight")
    source = target.replace(image_size=source_image_size, num_classes=head.shape[0] if head is not None else 0)
    if source.num_patches != grid_tokens:
        raise ValueError(f"source_image_size {source.image_size} implies {source.num_patches} patches, the weights hold {grid_tokens}")
    return adapt_state_dict(state_dict, source, target)


def to_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """vitflow's weights in timm's layout: load into ``timm.models.vision_transformer.VisionTransformer``
    built with the same config (``fc_norm=False`` for ``pool="avg"``)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}

