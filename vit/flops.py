"""FLOPs per image of a ViT, from its config alone.

Counted the way ``torch.utils.flop_counter`` counts: 2 FLOPs per multiply-add of every matmul and
convolution (patch embedding, qkv, attention scores and values, projections, MLP, head); norms,
softmax and GELU are left out (they are O(T * D), a few percent at most). Fine-tuning at a higher
resolution lengthens the sequence T = 1 + HW/P^2, and attention's cost grows with T^2.
"""

from __future__ import annotations

from vit.config import ViTConfig


def forward_flops(config: ViTConfig) -> int:
    """FLOPs of one image's forward pass."""
    dim, tokens = config.embed_dim, 1 + config.num_patches
    patch_dim = config.in_chans * config.patch_size**2
    patch_embed = 2 * config.num_patches * patch_dim * dim
    qkv = 2 * tokens * dim * 3 * dim
    scores_and_values = 2 * (2 * tokens * tokens * dim)  # q k^T and attn v, over all heads
    proj = 2 * tokens * dim * dim
    mlp = 2 * (2 * tokens * dim * config.mlp_dim)
    head = 2 * dim * config.num_classes
    return patch_embed + config.depth * (qkv + scores_and_values + proj + mlp) + head


def train_flops(config: ViTConfig) -> int:
    """FLOPs of one image's training step: the backward pass costs about twice the forward."""
    return 3 * forward_flops(config)


def gflops(config: ViTConfig) -> float:
    """Forward GFLOPs per image, the figure the paper's compute comparisons use."""
    return forward_flops(config) / 1e9
