"""The prediction stage (``vitflow predict MODEL_URI SOURCE OUT``, and a workflow's ``predict.NAME``): one
Parquet row per image of a folder, table or shard set, classified by a registered model on Ray Data
(``workflows.compute.predict``).

The run is logged to MLflow as a child of the model's own run (in a workflow, of the workflow's): what was predicted with which model
(params), how many images, how many bad ones, and the throughput (metrics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.storage import Location, StorageError
from workflows import tags as tag
from workflows import tracking
from workflows.compute import predict
from workflows.configs import PredictConfig, absolute_uri
from workflows.results import StageResult


@dataclass(frozen=True)
class PredictResult:
    run_id: str
    model_uri: str  # the version predicted with (an alias resolved)
    out: str
    images: int
    bad: int
    seconds: float
    images_per_s: float
    batch_size: int
    actors: int


def run_stage(section, name: str, model_uri: str, out: str, tracking_config, parent_run_id: str,
              stage_fingerprint: str) -> StageResult:
    """The workflow's ``predict.NAME`` stage: ``section`` (a ``workflows.spec.PredictStage``) with ``model_uri``,
    written to ``out``; its run is a child of the workflow's."""
    config = PredictConfig(model=model_uri, source=section.source, out=out, batch_size=section.batch_size,
                           actors=section.actors, top_k=section.top_k, precision=section.precision,
                           tracking=tracking_config)
    result = run_predict(config, parent_run_id=parent_run_id)
    return StageResult(stage=f"predict:{name}", run_id=result.run_id, fingerprint=stage_fingerprint,
                       model_uri=result.model_uri, output_uri=result.out,
                       metrics={"images": result.images, "bad_images": result.bad, "images_per_s": result.images_per_s})


def check_output(out: str) -> None:
    """Before any work: ``out`` can be written (a file, not a folder; on an object store, its bucket exists)."""
    target = Location(out)
    if target.is_dir():
        raise StorageError(f"{out}: is a folder; give the Parquet file to write")
    target.check_bucket()


def run_predict(config: PredictConfig, *, parent_run_id: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> PredictResult:
    """Classify every image of ``config.source``; needs a connected Ray. ``progress(done, total)`` as rows
    are written."""
    uri = config.tracking.uri or tracking.default_tracking_uri()
    model = config.model
    if "://" not in model and ":/" not in model:
        model = absolute_uri(model)  # a model folder: the actors do not run here
    model_uri = tracking.pinned_model_uri(uri, model)
    out = absolute_uri(config.out)
    check_output(out)
    listing = predict.list_inputs(absolute_uri(config.source))
    plain = tracking.load_plain_model(uri, model_uri)
    plan = predict.plan(plain.config, batch_size=config.batch_size, actors=config.actors)

    parent = parent_run_id or tracking.source_run(uri, model_uri)
    run_id = tracking.start_run(uri, config.tracking.experiment, "predict", parent_run_id=parent,
                                tags={tag.STAGE: "predict", tag.MODEL: model_uri})
    tracking.log_params(uri, run_id, {"model": model_uri, "source": config.source, "source_kind": listing.kind,
                                      "out": out, "batch_size": plan.batch_size, "actors": plan.actors,
                                      "top_k": config.top_k, "precision": config.precision})
    total = listing.num_images + len(listing.rejected)
    try:
        stats = predict.predict(listing, plain, model_uri, out, batch_size=plan.batch_size, actors=plan.actors,
                                gpus_per_actor=plan.gpus_per_actor, cpus_per_actor=plan.cpus_per_actor,
                                precision=config.precision, top_k=config.top_k, threads=plan.threads,
                                read_in_actors=plan.read_in_actors,
                                progress=(lambda done: progress(done, total)) if progress else None)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.log_metrics(uri, run_id, {"images": stats.images, "bad_images": stats.bad, "seconds": stats.seconds,
                                       "images_per_s": stats.images_per_s})
    if stats.ray_data_stats:  # where the time went: reading vs classifying, per operator
        tracking.log_text(uri, run_id, stats.ray_data_stats, "predict/ray_data_stats.txt")
    tracking.end_run(uri, run_id)
    return PredictResult(run_id=run_id, model_uri=model_uri, out=out, images=stats.images, bad=stats.bad,
                         seconds=stats.seconds, images_per_s=stats.images_per_s, batch_size=plan.batch_size,
                         actors=plan.actors)
