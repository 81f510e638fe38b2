"""The preprocess stage: one corpus sharded by ``pipeline`` (a Ray task on the workflow's cluster, fanning
out its own shard tasks), and what its MLflow run records."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.storage import Location
from workflows import tags as tag
from workflows import tracking


def preprocess_task(source: str, out: str, config: dict, workers: int | None) -> dict:
    """A preprocess stage as a Ray task: shards the corpus (its own shard tasks on the same Ray)."""
    from pipeline import ShardConfig, write_shards

    result = write_shards(source, out, ShardConfig.model_validate(config), workers=workers, progress=False)
    return {"out": out, "fingerprint": result.info.fingerprint, "num_inputs": result.num_inputs,
            "num_sharded": result.num_sharded, "num_quarantined": result.num_quarantined,
            "images_per_second": result.images_per_second, "built": len(result.built), "reused": len(result.reused)}


def log_preprocess(tracking_uri: str, run_id: str, summary: dict) -> None:
    """The stage's MLflow record: its counts and throughput, the dataset's fingerprint (tag and MLflow
    dataset input) and dataset.json; then the run is closed."""
    tracking.log_metrics(tracking_uri, run_id, {
        "inputs": summary["num_inputs"], "sharded": summary["num_sharded"], "quarantined": summary["num_quarantined"],
        "images_per_sec": summary["images_per_second"], "shards_built": summary["built"], "shards_reused": summary["reused"]})
    tracking.set_tags(tracking_uri, run_id, {tag.DATASET_FINGERPRINT: summary["fingerprint"]})
    out = Location(summary["out"])
    tracking.log_dataset(tracking_uri, run_id, out.uri, name=out.name, digest=summary["fingerprint"], context="shards")
    with tempfile.TemporaryDirectory() as tmp:  # the dataset may be in an object store: a local copy to log
        index = Path(tmp) / "dataset.json"
        index.write_bytes((out / "dataset.json").read_bytes())
        tracking.log_artifacts(tracking_uri, run_id, [index], "dataset")
    tracking.end_run(tracking_uri, run_id)
