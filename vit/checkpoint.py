"""Checkpoints and state dicts: what a training checkpoint holds, saving and loading it, rebuilding a model
from saved weights, and adapting weights to a new resolution, a new task or timm's layout.

A training checkpoint is ``<checkpoint_dir>/step-NNNNNN/checkpoint.pt`` (:data:`CHECKPOINT_FILE`): one dict,
laid out by :func:`training_state`, of plain tensors and primitive containers that load with
``torch.load(weights_only=True)``. Existing checkpoints must keep loading: change the layout only with a
new :data:`CHECKPOINT_VERSION`.

Fine-tuning at a higher resolution keeps the patch size, so the sequence gets longer and the learned
position embeddings no longer fit. The paper (Section 3.2) resamples them by 2D interpolation over the
patch grid; the [class] token's embedding has no grid position and is kept as is.
"""

from __future__ import annotations

import math
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vit.config import ViTConfig
from vit.ema import WeightEMA, ema_weights
from vit.model import VisionTransformer, sincos_pos_embed_2d

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "vitflow-checkpoint"
CHECKPOINT_VERSION = 1

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


# --- training checkpoints ------------------------------------------------------------------------


def training_state(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    train_config: Mapping[str, Any],
    precision: str,
    metadata: Mapping[str, Any],
    ema: WeightEMA | None = None,
    time_budget_used_s: float | None = None,
) -> dict[str, Any]:
    """The checkpoint of a training run after ``step`` optimiser steps, ``batch_in_epoch`` batches into
    ``epoch``: every key a checkpoint has. ``model_config`` is the model's ``config`` (``{}`` for a model
    without one); ``rng`` holds this process's generators (torch, CUDA, NumPy, Python); ``ema``, only in
    a run that keeps a weight EMA, its state (``vit.ema.WeightEMA.state_dict``: the averaged weights under
    ``module.`` and the update count ``n_averaged``); ``time_budget_used_s``, only in a run with a time
    budget (``train.time_budget_s``), the seconds of it used."""
    extra = {"ema": ema.state_dict()} if ema is not None else {}
    if time_budget_used_s is not None:
        extra["time_budget_used_s"] = float(time_budget_used_s)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "model": model.state_dict(),
        "model_config": model.config.to_dict() if hasattr(model, "config") else {},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(),
        "train_config": dict(train_config),
        "precision": precision,
        "metadata": dict(metadata),
        **extra,
    }


def restore_training_state(
    state: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: WeightEMA | None = None,
    origin: str = "checkpoint",
) -> tuple[int, int, int]:
    """Load a :func:`training_state` into the run's objects and this process's generators; return its
    ``(step, epoch, batch_in_epoch)``. A run with a weight EMA resumes only from a checkpoint that holds
    one (restarting the average from the current weights would not be the same run)."""
    if ema is not None and "ema" not in state:
        raise ValueError(f"{origin}: the run keeps a weight EMA (train.ema) but this checkpoint, written without "
                         "one, holds none to resume it from")
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return state["step"], state["epoch"], state["batch_in_epoch"]


def _rng_state() -> dict[str, Any]:
    """Every generator the loop or a caller may draw from, as tensors and primitives (weights_only)."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))


def save_checkpoint(directory: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (a :func:`training_state`) to ``directory/step-NNNNNN/checkpoint.pt`` atomically (a
    fresh directory per checkpoint, renamed into place) and return that directory."""
    target = Path(directory) / f"step-{state['step']:06d}"
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.save(dict(state), staging / CHECKPOINT_FILE)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint directory (or its ``checkpoint.pt``), loaded with ``weights_only=True`` on the CPU."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    state = load_weights_only(file)  # never unpickles objects or code, whatever the file holds
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{file}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
    return state


def model_from_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], config: ViTConfig | None = None, *, weights: str = "raw"
) -> VisionTransformer:
    """The ViT saved in ``checkpoint``, weights loaded strictly, in eval mode (its config is ``model.config``).
    ``weights="ema"`` takes a training checkpoint's weight EMA instead of its trained weights.

    ``checkpoint`` is a training checkpoint folder or its ``checkpoint.pt``, a checkpoint already loaded
    (:func:`load_checkpoint`), or bare weights (a state dict, e.g. a logged model's) with their ``config``.
    This rebuilds the model as it was trained; fine-tuning's new head and resolution are
    :func:`load_pretrained`'s job.
    """
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights must be 'raw' or 'ema', got {weights!r}")
    origin = "checkpoint"
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        origin = str(path / CHECKPOINT_FILE if path.is_dir() else path)
        checkpoint = load_checkpoint(path)
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        if config is not None:
            raise ValueError(f"{origin}: a {CHECKPOINT_FORMAT} holds its model config; give config only with bare weights")
        if not checkpoint.get("model_config") or "model" not in checkpoint:
            raise ValueError(f"{origin}: a {CHECKPOINT_FORMAT} without a ViT's model_config and weights")
        config = ViTConfig.from_dict(checkpoint["model_config"])
        if weights == "ema":
            if "ema" not in checkpoint:
                raise ValueError(f"{origin}: holds no weight EMA (the run was trained without train.ema)")
            state = ema_weights(checkpoint["ema"])
        else:
            state = checkpoint["model"]
    elif config is None:
        raise ValueError(f"{origin}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint "
                         "(bare weights need their config)")
    elif weights == "ema":
        raise ValueError(f"{origin}: bare weights hold no weight EMA")
    else:
        state = checkpoint
    model = VisionTransformer(config)
    try:
        model.load_state_dict(state)  # strict: every key, every shape
    except RuntimeError as error:
        raise ValueError(f"{origin}: the weights do not fit the model of its config ({' '.join(str(error).split())})") from None
    return model.eval()


# --- adapting weights ----------------------------------------------------------------------------


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

