"""The paper's views inside a trained ViT: Figure 7 (patch-embedding filters, position-embedding similarity,
mean attention distance) and Figure 6 (attention rollout).

Each view is a function returning its numbers as tensors and a ``write_*_figure`` function drawing them
to a PNG. Figures are drawn on matplotlib's off-screen Agg canvas, with no pyplot global state, so they
work in worker processes with no display. ``vit/__init__`` does not import this module: training never
pays for matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vit.data.config import IMAGENET_MEAN, IMAGENET_STD
from vit.model import VisionTransformer

NUM_PREFIX_TOKENS = 1  # the [class] token, first in every sequence


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)  # framework touch point: off-screen rendering
    return fig


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fig.savefig(path, format="png", dpi=dpi)  # no bbox_inches="tight": the PNG is exactly figsize * dpi
    return path


# --- Figure 7, left: principal components of the patch-embedding filters ----------------------------


class PrincipalComponents(NamedTuple):
    components: torch.Tensor  # (k, C, P, P): unit-norm filters, strongest first
    explained_variance_ratio: torch.Tensor  # (k,): each component's share of the filters' total variance


def patch_embedding_components(model: VisionTransformer, num_components: int = 28) -> PrincipalComponents:
    """The top principal components of the D patch-embedding filters E (Eq. 1), each a C x P x P image; the
    paper shows the first 28 (Figure 7, left). PCA of the filters centred on their mean, via SVD; each
    component's sign is fixed so its largest-magnitude entry is positive."""
    weight = model.patch_embed.proj.weight.detach().double().cpu()  # (D, C, P, P)
    filters = weight.reshape(weight.shape[0], -1)  # (D, C*P*P)
    _, singular, vh = torch.linalg.svd(filters - filters.mean(dim=0), full_matrices=False)  # vh: (r, C*P*P)
    k = min(num_components, vh.shape[0])
    components = vh[:k]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))  # (k, 1)
    components = components * largest.sign()
    variance = singular**2
    return PrincipalComponents(components.reshape(k, *weight.shape[1:]).float(),
                               (variance[:k] / variance.sum()).float())


def write_patch_embedding_figure(pcs: PrincipalComponents, path: str | Path, *, columns: int = 7,
                                 dpi: int = 100) -> Path:
    """The components as small images, each stretched to [0, 1] on its own: RGB for 3 channels, grey for 1,
    the channel mean otherwise."""
    components = pcs.components  # (k, C, P, P)
    count = components.shape[0]
    rows = -(-count // columns)
    fig = _new_figure(1.2 * columns, 1.2 * rows + 0.6)
    fig.suptitle("RGB embedding filters (principal components)")
    for index in range(count):
        filt = components[index]
        low, high = filt.min(), filt.max()
        filt = (filt - low) / (high - low).clamp_min(1e-12)  # (C, P, P) in [0, 1]
        ax = fig.add_subplot(rows, columns, index + 1)
        if filt.shape[0] == 3:
            ax.imshow(filt.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(filt.mean(dim=0).numpy(), cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"{100 * pcs.explained_variance_ratio[index]:.1f}%", fontsize=7)
        ax.axis("off")
    return _save(fig, path, dpi)


# --- Figure 7, center: position-embedding similarity -------------------------------------------------


def position_embedding_similarity(model: VisionTransformer) -> torch.Tensor:
    """(rows, cols, rows, cols): cosine similarity between the position embedding of the patch at
    (r, c) and that of every other patch (Figure 7, center). The [class] token's embedding is left out."""
    rows, cols = model.config.grid_size
    pos = model.pos_embed.detach().float().cpu()[0, NUM_PREFIX_TOKENS:]  # (N, D)
    pos = F.normalize(pos, dim=-1)
    return (pos @ pos.T).reshape(rows, cols, rows, cols)


def write_position_similarity_figure(similarity: torch.Tensor, path: str | Path, *, dpi: int = 100) -> Path:
    """A grid of grids: tile (r, c) shows patch (r, c)'s similarity to every patch, as in the paper. Drawn
    as one mosaic image with one-pixel gaps, so a 24 x 24 grid is as quick as a 4 x 4 one."""
    rows, cols = similarity.shape[:2]
    mosaic = np.full((rows * (rows + 1) - 1, cols * (cols + 1) - 1), np.nan)
    for r in range(rows):
        for c in range(cols):
            mosaic[r * (rows + 1): r * (rows + 1) + rows, c * (cols + 1): c * (cols + 1) + cols] = similarity[r, c].numpy()
    fig = _new_figure(6.5, 5.5)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="Cosine similarity")
    ax.set_xticks([c * (cols + 1) + (cols - 1) / 2 for c in range(cols)], labels=[str(c + 1) for c in range(cols)])
    ax.set_yticks([r * (rows + 1) + (rows - 1) / 2 for r in range(rows)], labels=[str(r + 1) for r in range(rows)])
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title("Position embedding similarity")
    return _save(fig, path, dpi)


# --- Figure 7, right: mean attention distance ---------------------------------------------------------


def patch_distances(grid_size: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, N) Euclidean distances in pixels between the centres of the patches of a row-major grid."""
    rows, cols = grid_size
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    centres = torch.stack([y.reshape(-1), x.reshape(-1)], dim=1) * patch_size  # (N, 2); offsets cancel
    return torch.cdist(centres, centres)


def attention_distance_from_maps(maps: Sequence[torch.Tensor], grid_size: tuple[int, int],
                                 patch_size: int) -> torch.Tensor:
    """(depth, heads) mean attention distance in pixels from per-block (B, h, T, T) attention weights: for
    each query patch, the attention-weighted mean pixel distance to the key patches, averaged over query
    patches and images (the paper's Figure 7, right, and Appendix D.7, over 128 images).

    The [class] token has no position, so only patch-to-patch attention counts, renormalised over the
    patches: the distance is where a head looks *among patches*. Without renormalising, a head that sends
    most of its weight to the [class] token would read as local however far its patch attention reaches.
    """
    distances = patch_distances(grid_size, patch_size)  # (N, N)
    per_block = []
    for attn in maps:
        patch_attn = attn[:, :, NUM_PREFIX_TOKENS:, NUM_PREFIX_TOKENS:].double()  # (B, h, N, N)
        patch_attn = patch_attn / patch_attn.sum(dim=-1, keepdim=True).clamp_min(1e-300)  # all on [class]: 0
        per_query = (patch_attn * distances.to(patch_attn.device)).sum(dim=-1)  # (B, h, N)
        per_block.append(per_query.mean(dim=(0, 2)).cpu())  # (h,)
    return torch.stack(per_block).float()


def mean_attention_distance(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """(depth, heads) mean attention distance in pixels over a batch of (B, C, H, W) model-ready images."""
    return attention_distance_from_maps(model.attention_maps(images), model.config.grid_size,
                                        model.config.patch_size)


def write_attention_distance_figure(distances: torch.Tensor, path: str | Path, *,
                                    image_size: int | None = None, dpi: int = 100) -> Path:
    """Mean attention distance against network depth, one point per head (coloured by head); with
    ``image_size`` the y axis spans at least the image side, as the paper's does."""
    depth, heads = distances.shape
    fig = _new_figure(5.0, 4.0)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    for head in range(heads):
        ax.scatter(range(1, depth + 1), distances[:, head].numpy(), s=14, color=cmap(head % 20),
                   label=f"Head {head + 1}")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(range(1, depth + 1))
    if image_size is not None:  # far corners of a grid lie more than an image side apart: keep them in view
        ax.set_ylim(0, max(float(image_size), 1.05 * float(distances.max())))
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title("Mean attention distance")
    fig.tight_layout()
    return _save(fig, path, dpi)


# --- Figure 6: attention rollout ----------------------------------------------------------------------


def rollout_from_maps(maps: Sequence[torch.Tensor], grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, rows, cols): attention rollout (Abnar & Zuidema, 2020; the paper's Appendix D.8) of the [class]
    token onto the input patches. Per block the heads' weights are averaged and the identity added for
    the residual connection, rows renormalised; the blocks' matrices are multiplied, last block leftmost.
    The [class] token's row over the patches is how much of the output's [class] token comes from each."""
    rollout = None
    for attn in maps:
        mixed = attn.double().mean(dim=1)  # (B, T, T)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout  # (B, T, T)
    if rollout is None:
        raise ValueError("attention rollout needs at least one block's attention maps")
    rows, cols = grid_size
    return rollout[:, 0, NUM_PREFIX_TOKENS:].reshape(-1, rows, cols).float().cpu()


def attention_rollout(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) rollout maps for a batch of (B, C, H, W) model-ready images."""
    return rollout_from_maps(model.attention_maps(images), model.config.grid_size)


def write_attention_rollout_figure(images: torch.Tensor, rollout: torch.Tensor, path: str | Path, *,
                                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                                   dpi: int = 100) -> Path:
    """The images (top row) and the rollout maps upsampled to them and overlaid (bottom row), as in Figure 6.
    ``images`` are the model's (B, C, H, W) inputs, normalised with ``mean`` and ``std``; each map is
    stretched to [0, 1] on its own."""
    count, chans, height, width = images.shape
    pixels = images.detach().float().cpu()
    if chans == len(mean):
        pixels = pixels * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    pixels = pixels.clamp(0, 1)  # (B, C, H, W)
    heat = F.interpolate(rollout[:, None].float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    low = heat.amin(dim=(1, 2), keepdim=True)
    high = heat.amax(dim=(1, 2), keepdim=True)
    heat = (heat - low) / (high - low).clamp_min(1e-12)  # (B, H, W) in [0, 1]
    fig = _new_figure(2.0 * count, 4.3)
    fig.suptitle("Attention rollout")
    for index in range(count):
        shown = pixels[index].permute(1, 2, 0).numpy() if chans == 3 else pixels[index].mean(dim=0).numpy()
        for row in range(2):
            ax = fig.add_subplot(2, count, row * count + index + 1)
            ax.imshow(shown, cmap=None if chans == 3 else "gray")
            if row == 1:
                ax.imshow(heat[index].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.axis("off")
    return _save(fig, path, dpi)


def write_vit_figures(model: VisionTransformer, images: torch.Tensor, directory: str | Path, *,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                      rollout_images: int = 8) -> dict[str, Path]:
    """All four views of ``model`` as PNGs in ``directory``: ``patch_embedding_pcs.png``,
    ``position_similarity.png``, ``attention_distance.png`` (over all of ``images``) and
    ``attention_rollout.png`` (over the first ``rollout_images``). Returns name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shown = images[:rollout_images]
    return {
        "patch_embedding_pcs": write_patch_embedding_figure(
            patch_embedding_components(model), directory / "patch_embedding_pcs.png"),
        "position_similarity": write_position_similarity_figure(
            position_embedding_similarity(model), directory / "position_similarity.png"),
        "attention_distance": write_attention_distance_figure(
            mean_attention_distance(model, images), directory / "attention_distance.png",
            image_size=max(model.config.image_size)),
        "attention_rollout": write_attention_rollout_figure(
            shown, attention_rollout(model, shown), directory / "attention_rollout.png", mean=mean, std=std),
    }
