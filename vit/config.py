"""The model's typed configuration and the paper's variant table.

Variants are named as in the ViT paper (Table 1) and DeiT (Ti, S): ``"B/16"`` is ViT-Base with 16x16
patches. Names are decoded in one place, :func:`decode_variant`, in the spirit of big_vision's
``decode_variant``; everything else is a keyword override of the table's row.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass
from typing import Literal

# width (D), depth (L), heads, MLP size: Table 1 of the paper, plus DeiT's Ti and S.
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "S": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "B": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "L": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "H": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}

_VARIANT_NAME = re.compile(r"^(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if _is_int(value):
        return (int(value), int(value))
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) for v in value):
        raise ValueError(f"invalid ViTConfig: image_size must be an int or a (height, width) pair of ints, got {value!r}")
    return (int(value[0]), int(value[1]))


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Everything that defines a ViT's architecture. Invalid combinations fail at construction."""

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: Literal["learned", "sincos"] = "learned"  # paper: learned 1D; 2D sin-cos as an option
    pool: Literal["token", "avg"] = "token"  # paper: the [class] token; global average pooling as an option
    dropout: float = 0.0  # after the embeddings, in the MLP and on attention outputs (paper Appendix B.1)
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth, linearly increasing over depth
    variant: str | None = None  # the paper name this config was decoded from, for display and tracking

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size))
        problems = []
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not _is_int(self.num_classes) or self.num_classes < 0:
            problems.append(f"num_classes must be an integer >= 0 (0: no head), got {self.num_classes!r}")
        for name in ("mlp_ratio", "dropout", "attn_dropout", "drop_path"):
            if not _is_number(getattr(self, name)):
                problems.append(f"{name} must be a number, got {getattr(self, name)!r}")
        if not isinstance(self.qkv_bias, bool):
            problems.append(f"qkv_bias must be true or false, got {self.qkv_bias!r}")
        if self.variant is not None and not isinstance(self.variant, str):
            problems.append(f"variant must be a string, got {self.variant!r}")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))
        height, width = self.image_size
        if height < 1 or width < 1:
            problems.append(f"image_size must be positive, got {self.image_size}")
        elif height % self.patch_size or width % self.patch_size:
            problems.append(
                f"image_size {height}x{width} is not divisible by patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed == "sincos" and self.embed_dim % 4:
            problems.append(f"2D sin-cos position embeddings need embed_dim divisible by 4, got {self.embed_dim}")
        if self.mlp_ratio <= 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.pos_embed not in ("learned", "sincos"):
            problems.append(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if self.pool not in ("token", "avg"):
            problems.append(f"pool must be 'token' or 'avg', got {self.pool!r}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid (rows, columns): N = rows * columns patches."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def replace(self, **changes) -> ViTConfig:
        """A copy with some fields changed, validated again (e.g. a new image size for fine-tuning)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain, JSON-able fields (the form stored next to checkpoints and logged as params)."""
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig keys: {', '.join(unknown)}")
        data = dict(data)
        if isinstance(data.get("image_size"), list):
            data["image_size"] = tuple(data["image_size"])
        return cls(**data)


def decode_variant(name: str, **overrides) -> ViTConfig:
    """``"B/16"`` -> ViT-Base, 16x16 patches; keyword overrides for anything else.

    >>> decode_variant("Ti/4", image_size=32, num_classes=10, depth=6).num_patches
    64
    """
    match = _VARIANT_NAME.match(name.strip()) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"variant {name!r} is not of the form SIZE/PATCH, e.g. 'B/16' or 'Ti/4'")
    size = match["size"]
    canonical = {k.lower(): k for k in VARIANTS}.get(size.lower())
    if canonical is None:
        raise ValueError(f"variant {name!r}: unknown model size {size!r} (known sizes: {', '.join(VARIANTS)})")
    fields = dict(VARIANTS[canonical], patch_size=int(match["patch"]), variant=f"{canonical}/{match['patch']}")
    fields.update(overrides)
    return ViTConfig(**fields)
