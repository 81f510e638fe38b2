"""Image corpora -> WebDataset shards + manifests (see ``docs/FORMAT.md``). Knows nothing of the model.

The public API is re-exported lazily, so ``import pipeline.manifest`` (what readers need) does not
pull in torch, PIL or Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardConfig": "pipeline.config",
    "write_shards": "pipeline.shards",
    "verify_shards": "pipeline.verify",
    "ShardResult": "pipeline.shards",
    "VerifyReport": "pipeline.verify",
    "open_source": "pipeline.sources",
    "SourceError": "pipeline.sources",
    "StorageError": "pipeline.shards",
    "DatasetInfo": "pipeline.manifest",
    "load_dataset_info": "pipeline.manifest",
    "read_manifest": "pipeline.manifest",
    "read_quarantine": "pipeline.manifest",
    "Reason": "pipeline.manifest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
