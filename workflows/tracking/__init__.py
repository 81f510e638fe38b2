"""The one MLflow adapter: everything vitflow records goes through here, so the rest of the code never
calls ``mlflow`` directly. One module per job:

- ``runs``: the store, runs (start, find, reopen, end), params, tags, artifacts, reachability, and the
  client every other module uses (with the network defaults applied);
- ``metrics``: metrics logged at once, buffered in the background, or spilled to a file;
- ``system``: MLflow's system metrics of a training process;
- ``registry``: registered versions, aliases, and the run behind a model;
- ``models``: a ViT logged as an MLflow model, and read back as weights, config and class names;
- ``offline``: a stage's output kept in a folder while the server is away, and its upload.
"""

from __future__ import annotations

import importlib

from workflows.tracking.metrics import (
    OFFLINE_METRICS,
    MetricBuffer,
    log_metrics,
    read_spilled_metrics,
    send_metrics,
    spill_metrics,
)
from workflows.tracking.registry import (
    finished_model,
    model_exists,
    pinned_model_uri,
    promote_if_better,
    register_model,
    resolve_version,
    source_run,
)
from workflows.tracking.runs import (
    CLIENT_DEFAULTS,
    TrackingUnavailable,
    client_defaults,
    default_tracking_uri,
    end_run,
    ensure_experiment,
    find_run,
    flatten_params,
    is_unreachable,
    last_step,
    log_artifacts,
    log_dataset,
    log_params,
    log_text,
    missing_store,
    reachable,
    reopen_run,
    run_metrics,
    run_params,
    run_status,
    run_url,
    runs_with_tags,
    set_tags,
    start_run,
    wait_reachable,
)
from workflows.tracking.system import (
    SYSTEM_METRICS_INTERVAL_S,
    SystemMetrics,
    start_system_metrics,
)

# `models` and `offline` import torch and the ViT (seconds); `vitflow ui` and the run queries need
# neither, so these names load on first use (PEP 562).
_LAZY = {
    **dict.fromkeys(("CLASSES_FILE", "CONFIG_FILE", "PREPROCESSING_FILE", "WEIGHTS_FILE", "LoggedModel",
                     "PlainModel", "load_plain_model", "log_model_figures", "log_vit_model", "logged_model_config",
                     "preprocessing_of"), "models"),
    **dict.fromkeys(("OFFLINE_MANIFEST", "Uploaded", "save_offline", "upload_offline"), "offline"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CLIENT_DEFAULTS",
    "OFFLINE_METRICS",
    "SYSTEM_METRICS_INTERVAL_S",
    "MetricBuffer",
    "SystemMetrics",
    "TrackingUnavailable",
    "client_defaults",
    "default_tracking_uri",
    "end_run",
    "ensure_experiment",
    "find_run",
    "finished_model",
    "flatten_params",
    "is_unreachable",
    "last_step",
    "log_artifacts",
    "log_dataset",
    "log_metrics",
    "log_params",
    "log_text",
    "missing_store",
    "model_exists",
    "pinned_model_uri",
    "promote_if_better",
    "reachable",
    "read_spilled_metrics",
    "register_model",
    "reopen_run",
    "resolve_version",
    "run_metrics",
    "run_params",
    "run_status",
    "run_url",
    "runs_with_tags",
    "send_metrics",
    "set_tags",
    "source_run",
    "spill_metrics",
    "start_run",
    "start_system_metrics",
    "wait_reachable",
    *_LAZY,
]
