"""What crosses between the runner and its stages: small, frozen, JSON-able records (URIs, run ids).

The runner hands a stage its spec section and a :class:`StageInputs` (the run name its fingerprint gives
it, the dataset it reads, the model it starts from, where it tracks and stores); the stage hands back a
:class:`StageResult`, which the runner stores as a tag of the stage's MLflow run so a rerun can reuse it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from workflows.configs import Tracking


@dataclass(frozen=True)
class StageResult:
    """What a stage hands the next ones."""

    stage: str  # "preprocess:cifar10", "pretrain", "finetune" (or "finetune:TASK"), "evaluate", "predict:NAME"
    run_id: str
    fingerprint: str
    reused: bool = False
    dataset_uri: str | None = None
    dataset_fingerprint: str | None = None
    model_uri: str | None = None  # models:/NAME/VERSION when registered
    output_uri: str | None = None  # a file the stage wrote (predict: its Parquet)
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("reused")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, reused: bool = True) -> StageResult:
        return cls(**json.loads(text), reused=reused)


@dataclass(frozen=True)
class StageInputs:
    """What the runner gives a training stage beside its spec section."""

    name: str  # the stage's run name: deterministic per fingerprint, so a rerun resumes the same runs
    fingerprint: str
    dataset: StageResult  # the preprocess result the stage reads
    model: str | None  # the model it starts from (its section's, else the upstream stage's), if any
    tracking: Tracking  # with the workflow's resolved tracking URI
    storage_path: str
    parent_run_id: str
    callbacks: Sequence[Any] = ()  # Tune callbacks for a search (a console's view of it)


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict, as floats (a result's metrics are JSON numbers)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
