"""WebDataset shards -> batches for one rank. One job per module:

- ``index``: ``dataset.json`` and ``manifest.parquet`` read and checked (``read_dataset_index``, ``check_dataset``,
  ``check_class_map``)
- ``shards``: one tar's samples, decoded to an image and its label (never unpickles anything)
- ``plan``: which samples each rank and worker reads each epoch (equal batches per rank, exact resume)
- ``transforms``: training and evaluation preprocessing, MixUp / CutMix
- ``config``: ``DataConfig``
- ``loader``: ``ShardLoader``, ``train_loader``, ``eval_loader``

The shard format is the contract with ``pipeline`` (``docs/FORMAT.md``); ``vit`` never imports ``pipeline``.
The names below are the package's public API.
"""

from vit.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from vit.data.index import (
    DataError,
    DatasetError,
    DatasetIndex,
    check_class_map,
    check_dataset,
    read_dataset_index,
)
from vit.data.loader import Batch, ShardLoader, eval_loader, train_loader

__all__ = [
    "Batch",
    "DataConfig",
    "DataError",
    "DatasetError",
    "DatasetIndex",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ShardLoader",
    "check_class_map",
    "check_dataset",
    "eval_loader",
    "read_dataset_index",
    "train_loader",
]
