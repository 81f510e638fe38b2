"""The prediction stage (``vitflow predict MODEL_URI SOURCE OUT``): one Parquet row per image of a folder,
table or shard set, classified by a registered model on Ray Data (``workflows.compute.predict``).

The run is logged to MLflow as a child of the model's own run: what was predicted with which model
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
                                progress=(lambda done: progress(done, total)) if progress else None)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.log_metrics(uri, run_id, {"images": stats.images, "bad_images": stats.bad, "seconds": stats.seconds,
                                       "images_per_s": stats.images_per_s})
    tracking.end_run(uri, run_id)
    return PredictResult(run_id=run_id, model_uri=model_uri, out=out, images=stats.images, bad=stats.bad,
                         seconds=stats.seconds, images_per_s=stats.images_per_s, batch_size=plan.batch_size,
                         actors=plan.actors)
