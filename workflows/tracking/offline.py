"""Offline bundles: what a stage would have logged while the tracking server was away, kept in a
folder (the plain model, its registry tags, the run to finish, the spilled metrics) and uploaded later."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vit import VisionTransformer
from vit.checkpoint import model_from_checkpoint
from vit.inference import write_model_files
from workflows.tracking.metrics import (
    OFFLINE_METRICS,
    read_spilled_metrics,
    send_metrics,
)
from workflows.tracking.models import load_plain_model, log_vit_model
from workflows.tracking.registry import register_model
from workflows.tracking.runs import TrackingUnavailable, end_run, wait_reachable

OFFLINE_MANIFEST = "upload.json"


def save_offline(folder: str | Path, *, tracking_uri: str, run_id: str, model: VisionTransformer,
                 class_names: list[str], preprocessing: Mapping[str, object], register_as: str | None,
                 tags: Mapping[str, object], stage: str) -> Path:
    """Keep what a stage would have logged (the plain model, the registry tags, the run to finish) in
    ``folder`` for :func:`upload_offline`; metrics spilled by training are already beside it."""
    folder = Path(folder)
    write_model_files(folder / "model", model.eval().cpu(), class_names, preprocessing)
    manifest = {"tracking_uri": tracking_uri, "run_id": run_id, "register_as": register_as, "stage": stage,
                "tags": {key: str(value) for key, value in tags.items()}, "saved_at": time.time()}
    (folder / OFFLINE_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return folder


@dataclass(frozen=True)
class Uploaded:
    run_id: str
    model_uri: str
    registered_name: str | None
    version: str | None
    metrics: int


def upload_offline(folder: str | Path, tracking_uri: str | None = None) -> Uploaded:
    """Send an offline bundle (:func:`save_offline`) to MLflow: its spilled metrics, the model (logged to
    its run and registered with its tags), and finish the run. Safe to repeat: registration is
    idempotent per run, and sent metrics are removed from the bundle."""
    folder = Path(folder)
    manifest_path = folder / OFFLINE_MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a vitflow offline bundle: {OFFLINE_MANIFEST} missing")
    done = folder / "uploaded.json"
    if done.is_file():  # uploaded before: nothing to send twice
        record = json.loads(done.read_text())
        return Uploaded(run_id=record["run_id"], model_uri=record["model_uri"], registered_name=record.get("register_as"),
                        version=record.get("version"), metrics=0)
    manifest = json.loads(manifest_path.read_text())
    uri = tracking_uri or manifest["tracking_uri"]
    if not wait_reachable(uri, within_s=10.0):
        raise TrackingUnavailable(f"MLflow at {uri} is unreachable; nothing was uploaded from {folder}")
    sent = 0
    spilled = folder / OFFLINE_METRICS
    if spilled.is_file():
        for run_id, metrics in read_spilled_metrics(spilled).items():
            send_metrics(uri, run_id, metrics)
            sent += len(metrics)
        spilled.rename(spilled.with_suffix(".sent.jsonl"))
    run_id = manifest["run_id"]
    plain = load_plain_model(uri, str(folder / "model"))
    model = model_from_checkpoint(plain.state_dict, plain.config)
    logged = log_vit_model(uri, run_id, model, plain.class_names, preprocessing=plain.preprocessing)
    version = None
    if manifest.get("register_as"):
        version = register_model(uri, logged.model_uri, manifest["register_as"], manifest.get("tags", {}), run_id)
    end_run(uri, run_id)
    manifest.update(uploaded_to=uri, model_uri=logged.model_uri, version=version, uploaded_at=time.time())
    done.write_text(json.dumps(manifest, indent=2))
    return Uploaded(run_id=run_id, model_uri=logged.model_uri, registered_name=manifest.get("register_as"),
                    version=version, metrics=sent)
