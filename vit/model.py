"""The Vision Transformer (Dosovitskiy et al., ICLR 2021), in plain PyTorch.

Eq. 1: z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
Eq. 2: z'_l = MSA(LN(z_{l-1})) + z_{l-1}
Eq. 3: z_l = MLP(LN(z'_l)) + z'_l
Eq. 4: y = LN(z_L^0)

Parameter names follow timm's ``VisionTransformer`` so public weights map one to one (see
``vit.checkpoint``). This module imports only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vit.config import ViTConfig


def sincos_pos_embed_2d(grid_size: tuple[int, int], embed_dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings, (rows * cols, D): half the channels encode the row, half
    the column (the paper's "2-dimensional embedding" variant, Appendix D.4, with MoCo v3's sin-cos)."""
    rows, cols = grid_size
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (D/4,)
    out_y = y.reshape(-1, 1) * omega  # (N, D/4)
    out_x = x.reshape(-1, 1) * omega
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)  # (N, D)
    return emb.float()


class PatchEmbed(nn.Module):
    """Eq. 1's linear projection E of flattened P x P patches.

    The weight is stored as a strided convolution's (D, C, P, P), timm's layout, but applied as the
    paper writes it: patches flattened to (B, N, C*P*P) and one matmul. The two are the same map; the
    matmul form avoids the convolution's slower backward on CPU.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, chans, height, width = x.shape
        p = self.patch_size
        if (height // p, width // p) != self.grid_size or height % p or width % p:
            raise ValueError(
                f"input image {height}x{width} does not match the model's patch grid {self.grid_size} "
                f"of {p}x{p} patches; adapt the checkpoint to the new size with vit.checkpoint.adapt_state_dict"
            )
        rows, cols = self.grid_size
        # (B, C, H, W) -> (B, C, rows, P, cols, P) -> (B, rows, cols, C, P, P) -> (B, N, C*P*P)
        patches = x.reshape(batch, chans, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)  # (B, N, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, fused: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, h, T, D/h) tensors.

    ``fused`` goes through ``scaled_dot_product_attention``, which dispatches to flash / memory-efficient
    kernels on GPUs. Written out, the same computation is two matmuls and a softmax: on CPU under bf16
    autocast that is faster to train (SDPA's fused CPU backward in bf16 is the slow part: about 1.6x for
    a Ti/4 step here, docs/BENCHMARKS.md).
    """
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, T, T)
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p)
    return weights @ v


class Attention(nn.Module):
    """Multi-head self-attention (Appendix A): one fused qkv projection, heads of size D/h."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attn_dropout = config.attn_dropout
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)
        self.proj_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, T, D/h)
        fused = not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu"))
        x = attention(q, k, v, self.attn_dropout if self.training else 0.0, fused)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)  # (B, T, D)
        return self.proj_drop(self.proj(x))

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) normalised tokens -> (B, h, T, T) weights softmax(q k^T / sqrt(d)), rows summing to 1,
        written out whatever ``forward`` dispatches to and without attention dropout: for inspection
        (the paper's Figures 6 and 7), not training."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)  # each (B, h, T, D/h)
        return ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)


class Mlp(nn.Module):
    """Two layers with a GELU non-linearity (Eq. 3)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_dim, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth (Huang et al., 2016): drop the whole residual branch per sample."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """A pre-norm encoder block (Eq. 2-3)."""

    def __init__(self, config: ViTConfig, drop_path_prob: float):
        super().__init__()
        self.drop_path_prob = drop_path_prob
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_prob, self.training)


class VisionTransformer(nn.Module):
    """ViT classifier. ``forward = forward_head(forward_features(x))``.

    ``seed``: the initial weights depend on it alone (drawn from a generator of their own: torch's global
    random state is left as it was); None draws them from the global state, as torch modules do."""

    def __init__(self, config: ViTConfig, seed: int | None = None):
        super().__init__()
        if seed is None:
            self._build(config)
        else:  # torch's own layers draw their default weights from the global state while being built
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._build(config)

    def _build(self, config: ViTConfig) -> None:
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Learned 1D embeddings (the paper's default), or fixed 2D sin-cos ones kept out of the optimiser.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, dim), requires_grad=config.pos_embed == "learned")
        self.pos_drop = nn.Dropout(config.dropout)
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]  # linear rule (DeiT)
        self.blocks = nn.Sequential(*(Block(config, rate) for rate in rates))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    def reset_parameters(self) -> None:
        """Initialisation as in the reference implementations (timm / big_vision)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias) if module.bias is not None else None
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding: LeCun normal over the flattened patch (fan_in = C * P * P).
        fan_in = self.patch_embed.proj.weight[0].numel()
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        with torch.no_grad():
            if self.config.pos_embed == "learned":
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            else:
                self.pos_embed.zero_()
                self.pos_embed[0, 1:] = sincos_pos_embed_2d(self.config.grid_size, self.config.embed_dim)

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides norms and biases."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, 1 + N, D) normalised tokens, the [class] token first."""
        x = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D), Eq. 1
        x = self.blocks(self.pos_drop(x))
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, D): the [class] token (Eq. 4) or the mean of the patch tokens."""
        if self.config.pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + N, D) tokens -> (B, K) logits, or the pooled (B, D) representation."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) images -> one (B, h, T, T) map of attention weights per block, T = 1 + N with the
        [class] token first. Runs ``forward_features``' path in eval mode (no dropout or stochastic depth)
        and reads each block's weights off the input its attention sees; the normal forward is untouched."""
        was_training = self.training
        self.eval()
        try:
            x = self.patch_embed(x)  # (B, N, D)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # Eq. 1
            maps = []
            for block in self.blocks:
                maps.append(block.attn.attention_weights(block.norm1(x)))  # (B, h, T, T)
                x = block(x)
        finally:
            self.train(was_training)
        return maps

    def reset_head(self, num_classes: int) -> None:
        """Install a zero-initialised D x K head: the paper's fine-tuning recipe (Section 3.2)."""
        self.config = self.config.replace(num_classes=num_classes)
        if num_classes == 0:
            self.head = nn.Identity()
            return
        ref = self.cls_token
        self.head = nn.Linear(self.config.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
