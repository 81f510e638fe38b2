"""vitflow's Vision Transformer: model, checkpoints and (later) data and training loops. Plain PyTorch:
nothing here imports ray or mlflow."""

from vit.checkpoint import adapt_state_dict, from_timm_state_dict, load_pretrained, resample_pos_embed, to_timm_state_dict
from vit.config import VARIANTS, ViTConfig, decode_variant
from vit.flops import forward_flops, gflops, train_flops
from vit.model import VisionTransformer

__all__ = [
    "VARIANTS",
    "ViTConfig",
    "VisionTransformer",
    "adapt_state_dict",
    "decode_variant",
    "forward_flops",
    "from_timm_state_dict",
    "gflops",
    "load_pretrained",
    "resample_pos_embed",
    "to_timm_state_dict",
    "train_flops",
]
