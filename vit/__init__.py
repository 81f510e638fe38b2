"""vitflow's Vision Transformer: model, checkpoints, shard loading and the training loop. Plain PyTorch:
nothing here imports ray or mlflow."""

from vit.checkpoint import (
    adapt_state_dict,
    from_timm_state_dict,
    load_checkpoint,
    load_pretrained,
    model_from_checkpoint,
    resample_pos_embed,
    to_timm_state_dict,
)
from vit.config import VARIANTS, ViTConfig, decode_variant
from vit.data import (
    Batch,
    DataConfig,
    DataError,
    ShardLoader,
    eval_loader,
    read_dataset_index,
    train_loader,
)
from vit.evaluation import (
    ClassificationMetrics,
    classification_metrics,
    confusion_matrix_figure,
    predict,
)
from vit.finetune import FinetuneConfig, paper_finetune_optim, prepare_finetune_model
from vit.flops import forward_flops, gflops, train_flops
from vit.loop import NonFiniteLossError, TrainConfig, evaluate, fit
from vit.model import VisionTransformer
from vit.optim import OptimConfig, build_optimizer, build_schedule, param_groups
from vit.precision import Hardware, probe, resolve_precision

__all__ = [
    "Batch",
    "ClassificationMetrics",
    "DataConfig",
    "DataError",
    "FinetuneConfig",
    "Hardware",
    "NonFiniteLossError",
    "OptimConfig",
    "ShardLoader",
    "TrainConfig",
    "build_optimizer",
    "build_schedule",
    "classification_metrics",
    "confusion_matrix_figure",
    "eval_loader",
    "evaluate",
    "fit",
    "load_checkpoint",
    "paper_finetune_optim",
    "param_groups",
    "predict",
    "probe",
    "prepare_finetune_model",
    "read_dataset_index",
    "resolve_precision",
    "train_loader",
    "VARIANTS",
    "ViTConfig",
    "VisionTransformer",
    "adapt_state_dict",
    "decode_variant",
    "forward_flops",
    "from_timm_state_dict",
    "gflops",
    "load_pretrained",
    "model_from_checkpoint",
    "resample_pos_embed",
    "to_timm_state_dict",
    "train_flops",
]
