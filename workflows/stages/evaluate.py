"""The evaluation stage (``vitflow evaluate MODEL_URI DATASET``).

Evaluation logs a child run of the model's own run: top-1, top-5, per-class accuracy, the confusion
matrix (PNG and Parquet table) and the paper's Figure 6/7 views of the model (``vit.figures``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from vit.data import check_class_map, eval_loader, read_dataset_index
from workflows import tags as tag
from workflows import tracking
from workflows.configs import EvaluateConfig
from workflows.results import StageInputs, StageResult


@dataclass(frozen=True)
class EvaluateResult:
    run_id: str
    top1: float
    top5: float
    per_class_accuracy: dict[str, float | None]
    num_samples: int


def run_stage(section, inputs: StageInputs) -> StageResult:
    """The workflow's evaluation stage (its spec section: ``split``, ``batch_size``) of the model given."""
    config = EvaluateConfig(model=inputs.model, dataset=inputs.dataset.dataset_uri, split=section.split,
                            batch_size=section.batch_size, tracking=inputs.tracking)
    result = run_evaluate(config, parent_run_id=inputs.parent_run_id)
    return StageResult(stage="evaluate", run_id=result.run_id, fingerprint=inputs.fingerprint,
                       dataset_fingerprint=inputs.dataset.dataset_fingerprint,
                       metrics={f"{config.split}/top1": result.top1, f"{config.split}/top5": result.top5})


def run_evaluate(config: EvaluateConfig, *, parent_run_id: str | None = None) -> EvaluateResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vit.checkpoint import model_from_checkpoint
    from vit.evaluation import classification_metrics, confusion_matrix_figure, predict
    from vit.inference import data_config
    uri = config.tracking.uri or tracking.default_tracking_uri()
    plain = tracking.load_plain_model(uri, config.model)
    index = read_dataset_index(config.dataset)
    index.split(config.split)
    check_class_map(plain.class_names, index.class_names, f"model {config.model}", f"dataset {config.dataset}")
    model = model_from_checkpoint(plain.state_dict, plain.config)
    data = data_config(plain.preprocessing, plain.config.image_size[0], config.batch_size)
    logits, labels = predict(model, eval_loader(config.dataset, data, rank=0, world_size=1, split=config.split))
    metrics = classification_metrics(logits, labels, list(index.class_names))

    parent = parent_run_id or tracking.source_run(uri, config.model)
    experiment = config.tracking.experiment
    run_id = tracking.start_run(uri, experiment, f"evaluate-{config.split}", parent_run_id=parent,
                                tags={tag.STAGE: "evaluate", tag.MODEL: config.model,
                                      tag.DATASET_FINGERPRINT: index.fingerprint, tag.SPLIT: config.split})
    tracking.log_params(uri, run_id, {"model": config.model, "dataset": config.dataset, "split": config.split})
    per_class = {name: (None if value != value else float(value))
                 for name, value in zip(index.class_names, metrics.per_class_accuracy.tolist())}
    tracking.log_metrics(uri, run_id, {
        f"{config.split}/top1": metrics.top1, f"{config.split}/top5": metrics.top5,
        f"{config.split}/num_samples": metrics.num_samples,
        **{f"{config.split}/class_accuracy/{name}": value for name, value in per_class.items() if value is not None},
    })
    with tempfile.TemporaryDirectory() as tmp:
        png = confusion_matrix_figure(metrics.confusion_matrix, list(index.class_names), Path(tmp) / "confusion_matrix.png")
        table = Path(tmp) / "confusion_matrix.parquet"
        confusion = metrics.confusion_matrix.tolist()
        pq.write_table(pa.table({"true_class": list(index.class_names),
                                 **{predicted: [row[j] for row in confusion] for j, predicted in enumerate(index.class_names)},
                                 "accuracy": [per_class[name] for name in index.class_names]}), table)
        tracking.log_artifacts(uri, run_id, [png, table], "evaluation")
    tracking.log_model_figures(uri, run_id, model, config.dataset, config.split, data, config.figure_images)
    tracking.end_run(uri, run_id)
    return EvaluateResult(run_id=run_id, top1=metrics.top1, top5=metrics.top5, per_class_accuracy=per_class,
                          num_samples=metrics.num_samples)
