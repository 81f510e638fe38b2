"""The one MLflow adapter: experiments, nested runs, buffered metrics, ViT models and the registry.

Everything vitflow records goes through here, so the rest of the code never calls ``mlflow`` directly.
A ViT is logged once as an MLflow model that serves (``mlflow.pyfunc`` / ``mlflow.pytorch``, exported
with ``torch.export``: no pickle) and carries, as extra files of the same model, the plain weights
(``weights.pt``, loaded with ``torch.load(weights_only=True)``), the ``ViTConfig`` and the class names:
the form fine-tuning reads. So one URI (``models:/vit-pretrained/3``, ``runs:/<id>/model``) is enough.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.models import infer_signature
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
from mlflow.tracking import MlflowClient

from vit import ViTConfig, VisionTransformer
from vit.checkpoint import load_weights_only, model_from_checkpoint
from workflows import tags as tag

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "vit_config.json"
CLASSES_FILE = "class_names.json"
PREPROCESSING_FILE = "preprocessing.json"  # what inputs the model expects: resolution, mean, std, crop

# Bounded network behaviour: a tracking server that is down must not hang training for minutes per call.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def _using(tracking_uri: str):
    """MLflow's fluent API with ``tracking_uri`` for the block only. ``mlflow.set_tracking_uri`` also
    exports MLFLOW_TRACKING_URI to the environment, which would leak into whatever runs next in this
    process (and its children): the previous state is restored on the way out."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous_tracking, previous_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_tracking)
        mlflow.set_registry_uri(previous_registry)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def default_tracking_uri(workdir: str | Path = ".") -> str:
    """An embedded store under the working directory: SQLite for runs and the registry."""
    return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db')}"


def ensure_experiment(name: str, tracking_uri: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created on first use (with its artifact location: Ray's MLflow callback
    cannot choose one, so vitflow creates experiments itself)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create a run (nested under ``parent_run_id`` when given) and return its id. The run stays
    RUNNING until :func:`end_run`; any process may log to it by id."""
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[tag.PARENT_RUN] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run RUNNING again: a resumed stage keeps logging into the run it started."""
    MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")


def log_dataset(tracking_uri: str, run_id: str, path: str, *, name: str, digest: str, context: str) -> None:
    """Record a shard dataset as the run's input (``mlflow.data``), identified by its fingerprint."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = resolve_dataset_source(path if "://" in path else str(Path(path).resolve()))
    dataset = MetaDataset(source=source, name=name, digest=digest[:36])
    MlflowClient(tracking_uri).log_inputs(
        run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    )


def finished_model(tracking_uri: str, run_id: str, registered_name: str | None) -> tuple[str, str | None, dict[str, float]] | None:
    """(model URI, registered version, final metrics) of a FINISHED run that logged a model; else None."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    if run.info.status != "FINISHED" or not run.outputs or not run.outputs.model_outputs:
        return None
    version = None
    if registered_name:
        versions = client.search_model_versions(f"name = '{registered_name}' and run_id = '{run_id}'")
        if not versions:
            return None
        version = str(versions[0].version)
    return f"models:/{run.outputs.model_outputs[-1].model_id}", version, dict(run.data.metrics)


def log_metrics(tracking_uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
    )


def log_artifacts(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    client = MlflowClient(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def resolve_version(tracking_uri: str, model_uri: str) -> str | None:
    """The registered version behind ``models:/name/3`` or ``models:/name@alias``; None for other URIs."""
    if not model_uri.startswith("models:/"):
        return None
    name_and_ref = model_uri.removeprefix("models:/").split("/")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if "@" in name_and_ref[0]:
        name, alias = name_and_ref[0].split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    return name_and_ref[1] if len(name_and_ref) > 1 else None


def source_run(tracking_uri: str, model_uri: str) -> str | None:
    """The run that logged a model: for registered versions, aliases, runs:/ and models:/m-... URIs."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if model_uri.startswith("runs:/"):
        return model_uri.removeprefix("runs:/").split("/")[0]
    if not model_uri.startswith("models:/"):
        return None
    reference = model_uri.removeprefix("models:/")
    if reference.startswith("m-"):
        return client.get_logged_model(reference.split("/")[0]).source_run_id
    version = resolve_version(tracking_uri, model_uri)
    name = reference.split("@")[0].split("/")[0]
    return client.get_model_version(name, version).run_id if version else None


def promote_if_better(tracking_uri: str, name: str, version: str, alias: str, *, test_key: str, score: float) -> bool:
    """Point ``alias`` at ``version`` when the alias is free, or its holder scored lower on the same test
    split (``test_key``: dataset fingerprint and split). A holder measured on another split cannot be
    compared, so it keeps the alias. Returns whether ``version`` holds the alias now."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        holder = None
    if holder is not None:
        if str(holder.version) == str(version):
            return True
        same_split = holder.tags.get("test_split") == test_key
        holder_score = float(holder.tags.get("test_top1", "nan"))
        if same_split and not score > holder_score:
            log.info("%s@%s stays on version %s (%.4f >= %.4f)", name, alias, holder.version, holder_score, score)
            return False
        if not same_split:
            log.info("%s@%s was measured on another test split; comparing is impossible, keeping it", name, alias)
            return False
    client.set_registered_model_alias(name, alias, str(version))
    return True


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, object]) -> None:
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient(tracking_uri).log_text(run_id, text, artifact_file)


def runs_with_tags(tracking_uri: str, experiment: str, tags: Mapping[str, str], status: str | None = None) -> list:
    """Runs of ``experiment`` carrying all ``tags`` (newest first), optionally only in ``status``."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    if status:
        query += f" and attributes.status = '{status}'"
    return client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])


def missing_store(tracking_uri: str) -> Path | None:
    """The file of an embedded store (``sqlite:///PATH``) that does not exist yet, else None: MLflow would
    create an empty store there on first use, e.g. just to look a model up in it."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return None if path.is_file() else path


def model_exists(tracking_uri: str, model_uri: str) -> bool:
    """Whether a registered version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``), a logged model
    (``models:/m-...``) or a run (``runs:/ID/...``) exists."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    reference = model_uri.removeprefix("models:/")
    try:
        if model_uri.startswith("runs:/"):
            client.get_run(model_uri.removeprefix("runs:/").split("/")[0])
        elif reference.startswith("m-"):
            client.get_logged_model(reference.split("/")[0])
        elif "@" in reference:
            name, alias = reference.split("@", 1)
            client.get_model_version_by_alias(name, alias)
        else:
            name, version = reference.split("/")[:2]
            client.get_model_version(name, version)
    except (mlflow.exceptions.MlflowException, ValueError):
        return False
    return True


def run_url(tracking_uri: str, experiment: str, run_id: str) -> str:
    """Where a person sees the run: the tracking server's UI, or the one `vitflow ui` starts."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else "0"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def latest_step(tracking_uri: str, experiment: str, stage: str, parent_run_id: str) -> str:
    """'step N, loss L' of the newest training run of ``stage`` under ``parent_run_id`` (for live views)."""
    runs = runs_with_tags(tracking_uri, experiment, {tag.STAGE: stage, tag.PARENT_RUN: parent_run_id})
    if not runs:
        return ""
    metrics = runs[0].data.metrics
    if "train/loss" not in metrics:
        return "starting"
    history = MlflowClient(tracking_uri).get_metric_history(runs[0].info.run_id, "train/loss")
    last = max(history, key=lambda m: m.step)
    return f"step {last.step}, loss {last.value:.3f}"


def run_status(tracking_uri: str, run_id: str) -> str:
    return MlflowClient(tracking_uri).get_run(run_id).info.status


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The latest value of each metric of a run."""
    return dict(MlflowClient(tracking_uri).get_run(run_id).data.metrics)


def last_step(tracking_uri: str, run_id: str, key: str) -> int:
    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def find_run(tracking_uri: str, experiment: str, tags: Mapping[str, str], statuses=("RUNNING", "FINISHED", "FAILED", "KILLED")) -> str | None:
    """The newest run of ``experiment`` carrying all ``tags`` (used to resume a stage's run)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=20)
    runs = [run for run in runs if run.info.status in statuses]
    return runs[0].info.run_id if runs else None


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, str]:
    """Nested configuration -> MLflow params ``model.embed_dim=192`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


SYSTEM_METRICS_INTERVAL_S = 5.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


def start_system_metrics(tracking_uri: str, run_id: str, node_id: str | None = None) -> SystemMetrics | None:
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through NVML when a
    GPU is present) for ``run_id``, sampled from this process's machine every few seconds in a background
    thread until ``finish()``. ``node_id`` names the metrics ``system/<node_id>/...``, so the workers of a
    multi-node run appear side by side. None when MLflow cannot monitor (a warning says why): training
    never depends on it."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=True,
                                       node_id=node_id, tracking_uri=tracking_uri)
    except Exception as error:  # e.g. an unreachable server while it looks up the run's last step
        log.warning("system metrics for run %s are off: %s", run_id, error)
        return None
    monitor.start()
    return SystemMetrics(monitor)


class SystemMetrics:
    """A running ``SystemMetricsMonitor``; ``finish`` also logs a last sample, so a run shorter than the
    sampling interval still has one."""

    def __init__(self, monitor):
        self.monitor = monitor

    def finish(self) -> None:
        self.monitor.finish()  # stops and joins the sampling thread
        try:
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
            self.monitor.mlflow_logger.flush()
        except Exception as error:  # the server away at the end: the samples already sent stay
            log.warning("last system metrics sample not logged: %s", error)


def log_params(tracking_uri: str, run_id: str, params: Mapping) -> None:
    client = MlflowClient(tracking_uri)
    existing = client.get_run(run_id).data.params
    fresh = {k: v for k, v in flatten_params(params).items() if k not in existing}  # params are write-once
    items = list(fresh.items())
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 100]])


class MetricBuffer:
    """Metrics for one run, sent in batches by a background thread, so training never waits on tracking.

    When the tracking server is unreachable the metrics are kept (up to ``max_buffered``) and sent again
    with growing pauses (up to ``max_backoff_s``) until it is back. :meth:`close` makes a last bounded
    attempt and, if the server is still away, writes what is left to ``spill_path`` (JSON lines) for
    :func:`upload_offline`: nothing measured is lost.
    """

    def __init__(self, tracking_uri: str, run_id: str, flush_every_s: float = 5.0, max_buffered: int = 1_000_000,
                 max_backoff_s: float = 30.0):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.flush_every_s = flush_every_s
        self.max_buffered = max_buffered
        self.max_backoff_s = max_backoff_s
        self.pending: list[Metric] = []
        self.failures = 0  # failed send attempts, all told
        self.sent = 0
        self.retry_at = 0.0  # monotonic time before which the background thread does not try again
        self._streak = 0  # consecutive failures: the back-off grows with it
        self._lock = threading.Lock()  # guards `pending`
        self._sending = threading.Lock()  # one send at a time
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._streak == 0

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(key, float(value), now, step) for key, value in metrics.items() if _is_number(value)]
        with self._lock:
            self.pending.extend(fresh)
            if len(self.pending) > self.max_buffered:
                dropped = len(self.pending) - self.max_buffered
                log.warning("MLflow metric buffer full: dropping the %d oldest metrics", dropped)
                del self.pending[:dropped]

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            if not self._closed.is_set() and time.monotonic() >= self.retry_at:
                self.flush()

    def flush(self) -> bool:
        """Send what is pending now; True when nothing is left over. Called by the background thread, and
        by training where a report must be on record before it goes on (a search may stop a trial)."""
        with self._sending:
            while True:
                with self._lock:
                    batch = self.pending[:1000]  # MLflow's log_batch limit
                if not batch:
                    return True
                try:
                    self.client.log_batch(self.run_id, metrics=batch)
                except Exception as error:  # any transport or server error: keep the metrics, retry later
                    self.failures += 1
                    self._streak += 1
                    self.retry_at = time.monotonic() + min(self.max_backoff_s, 2.0 ** self._streak)
                    if self._streak == 1:
                        log.warning("MLflow at %s unreachable (%s); metrics are kept and sent when it is back",
                                    self.tracking_uri, type(error).__name__)
                    return False
                if self._streak:
                    log.warning("MLflow at %s reachable again after %d failed attempt(s): sending the kept metrics",
                                self.tracking_uri, self._streak)
                self._streak = 0
                self.sent += len(batch)
                with self._lock:
                    del self.pending[: len(batch)]

    def flush_if_healthy(self) -> bool:
        """:meth:`flush` unless the server is known to be away (then training does not wait for it)."""
        return self.flush() if self.healthy else False

    def close(self, timeout_s: float = 30.0, spill_path: str | Path | None = None) -> bool:
        """Stop the background thread; keep trying to send for up to ``timeout_s``; then write anything
        still pending to ``spill_path``. True when everything reached MLflow."""
        self._closed.set()
        self._wake.set()
        self._thread.join()
        deadline = time.monotonic() + timeout_s
        while not self.flush() and time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        with self._lock:
            left = list(self.pending)
        if left and spill_path is not None:
            spill_metrics(spill_path, self.run_id, left)
            log.warning("MLflow at %s still unreachable: %d metrics written to %s for `vitflow upload`",
                        self.tracking_uri, len(left), spill_path)
        return not left


def spill_metrics(path: str | Path, run_id: str, metrics: list[Metric]) -> None:
    """Append ``metrics`` of ``run_id`` to a JSON-lines file (the offline bundle's metrics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for m in metrics:
            handle.write(json.dumps({"run_id": run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp,
                                     "step": m.step}) + "\n")


def read_spilled_metrics(path: str | Path) -> dict[str, list[Metric]]:
    """The metrics :func:`spill_metrics` wrote, per run id."""
    found: dict[str, list[Metric]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            found.setdefault(row["run_id"], []).append(Metric(row["key"], float(row["value"]), int(row["timestamp"]), int(row["step"])))
    return found


def send_metrics(tracking_uri: str, run_id: str, metrics: list[Metric]) -> None:
    client = MlflowClient(tracking_uri)
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


# --- an unreachable tracking server: wait a bounded time, else keep the stage's output locally ----------

OFFLINE_MANIFEST = "upload.json"
OFFLINE_METRICS = "metrics.jsonl"


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within the configured time."""


def reachable(tracking_uri: str, timeout_s: float = 5.0) -> bool:
    """Whether an MLflow server answers at all (any HTTP status: a basic-auth server refusing an
    anonymous probe is up). Local stores (sqlite, files) are always reachable."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException:
        return False
    return True


def wait_reachable(tracking_uri: str, within_s: float) -> bool:
    """Poll until the tracking server answers or ``within_s`` passes."""
    deadline = time.monotonic() + within_s
    while not reachable(tracking_uri):
        if time.monotonic() >= deadline:
            return False
        time.sleep(2.0)
    return True


def is_unreachable(error: BaseException, tracking_uri: str) -> bool:
    """True when ``error`` comes from the tracking server being away (not from a bad request)."""
    import requests

    seen = error
    while seen is not None:
        if isinstance(seen, (TrackingUnavailable, requests.ConnectionError, requests.Timeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(error, mlflow.exceptions.MlflowException) and not reachable(tracking_uri)


def save_offline(folder: str | Path, *, tracking_uri: str, run_id: str, model: VisionTransformer,
                 class_names: list[str], preprocessing: Mapping[str, object], register_as: str | None,
                 tags: Mapping[str, object], stage: str) -> Path:
    """Keep what a stage would have logged (the plain model, the registry tags, the run to finish) in
    ``folder`` for :func:`upload_offline`; metrics spilled by training are already beside it."""
    folder = Path(folder)
    (folder / "model").mkdir(parents=True, exist_ok=True)
    _write_plain_model(folder / "model", model.eval().cpu(), class_names, preprocessing)
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


@dataclass(frozen=True)
class LoggedModel:
    model_uri: str  # models:/m-<id>: MLflow's LoggedModel, linked to the run
    run_id: str


def log_vit_model(
    tracking_uri: str,
    run_id: str,
    model: VisionTransformer,
    class_names: list[str],
    *,
    preprocessing: Mapping[str, object] | None = None,
    name: str = "model",
) -> LoggedModel:
    """Log ``model`` to ``run_id``: an exported MLflow pytorch model with a signature and a batch-2
    input example (so the batch dimension stays dynamic), plus the plain weights, config and class
    names fine-tuning needs."""
    model = model.eval().cpu()
    height, width = model.config.image_size
    example = np.random.default_rng(0).standard_normal((2, model.config.in_chans, height, width)).astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        extra = _write_plain_model(Path(tmp), model, class_names, preprocessing or {})
        with _using(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                signature=signature,
                input_example=example,
                extra_files=[str(path) for path in extra],
                serialization_format="pt2",  # torch.export: loading it runs no pickle
            )
    return LoggedModel(model_uri=info.model_uri, run_id=run_id)


def _write_plain_model(folder: Path, model: VisionTransformer, class_names: list[str],
                       preprocessing: Mapping[str, object]) -> list[Path]:
    weights, config, classes = folder / WEIGHTS_FILE, folder / CONFIG_FILE, folder / CLASSES_FILE
    (folder / PREPROCESSING_FILE).write_text(json.dumps(dict(preprocessing), indent=2))
    torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()}, weights)
    config.write_text(json.dumps(model.config.to_dict(), indent=2))
    classes.write_text(json.dumps(list(class_names)))
    return [weights, config, classes, folder / PREPROCESSING_FILE]


def register_model(tracking_uri: str, model_uri: str, name: str, tags: Mapping[str, object], run_id: str) -> str:
    """Register ``model_uri`` as a new version of ``name`` and return the version. Idempotent per run:
    when ``run_id`` already registered a version of ``name`` (a resumed or repeated stage), that one is
    returned, so reruns never create duplicate versions."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        log.info("%s version %s was already registered by run %s", name, version.version, run_id)
        return str(version.version)
    with _using(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags={key: str(value) for key, value in tags.items()})
    return str(version.version)


def _logged_model_uri(tracking_uri: str, model_uri: str) -> str:
    """``runs:/<id>/model`` -> the run's logged model (``models:/m-...``): since MLflow 3 a model logged
    in a run lives outside the run's artifacts. Other URIs pass through."""
    if not model_uri.startswith("runs:/"):
        return model_uri
    run_id = model_uri.removeprefix("runs:/").split("/")[0]
    try:
        outputs = MlflowClient(tracking_uri).get_run(run_id).outputs
    except mlflow.exceptions.MlflowException:
        return model_uri
    if outputs and outputs.model_outputs:
        return f"models:/{outputs.model_outputs[-1].model_id}"
    return model_uri


def logged_model_config(tracking_uri: str, model_uri: str) -> ViTConfig:
    """A logged ViT's architecture alone, read from its ``vit_config.json`` (a few hundred bytes) without
    downloading its weights: for checks before any work starts. Takes the URIs :func:`load_plain_model` takes."""
    local = Path(model_uri)
    if local.exists():
        found = next((path for path in (local / "extra_files" / CONFIG_FILE, local / CONFIG_FILE) if path.is_file()), None)
        text = found.read_text() if found else None
    else:
        store = missing_store(tracking_uri)
        if store is not None:
            raise ValueError(f"model {model_uri!r} cannot be resolved: there is no tracking store at {store}")
        text = _logged_file(tracking_uri, _logged_model_uri(tracking_uri, model_uri), CONFIG_FILE)
    if text is None:
        raise ValueError(f"model {model_uri!r} is not a vitflow ViT: it holds no {CONFIG_FILE}")
    try:
        return ViTConfig.from_dict(json.loads(text))
    except (ValueError, TypeError) as error:
        raise ValueError(f"model {model_uri!r}: {CONFIG_FILE} is not a ViT configuration: {error}") from None


def _logged_file(tracking_uri: str, model_uri: str, name: str) -> str | None:
    """One of the plain files a logged model holds (under extra_files/, as log_vit_model writes them, or at
    its top), or None."""
    with tempfile.TemporaryDirectory(prefix="vitflow-file-") as scratch, _using(tracking_uri):
        for path in (f"extra_files/{name}", name):
            try:
                if model_uri.startswith("models:/"):  # a file inside models:/m-... has no URI of its own
                    local = ModelsArtifactRepository(model_uri).download_artifacts(path, scratch)
                else:
                    local = mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/{path}", dst_path=scratch)
            except (mlflow.exceptions.MlflowException, OSError):
                continue
            return Path(local).read_text()
    return None


@dataclass(frozen=True)
class PlainModel:
    """What fine-tuning and evaluation need from a logged ViT: no pickle, no exported graph."""

    config: ViTConfig
    state_dict: dict[str, torch.Tensor]
    class_names: list[str]
    source_uri: str
    preprocessing: dict  # mean, std, crop_pct the model was trained with ({} when unknown)


def load_plain_model(tracking_uri: str, model_uri: str) -> PlainModel:
    """Resolve ``models:/name/3``, ``models:/name@alias``, ``runs:/<id>/model`` or a local folder of a
    logged ViT to its weights, config and class names."""
    local = Path(model_uri)
    if not local.exists():
        if not urlparse(model_uri).scheme:
            raise ValueError(f"model {model_uri!r}: no such folder (give a model folder, or a models:/ or runs:/ URI)")
        store = missing_store(tracking_uri)
        if store is not None:
            raise ValueError(f"model {model_uri!r} cannot be resolved: there is no tracking store at {store} "
                             "(run where the workflow's mlflow.db is, or give its tracking URI)")
        try:
            with _using(tracking_uri):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=_logged_model_uri(tracking_uri, model_uri)))
        except mlflow.exceptions.MlflowException as error:
            raise ValueError(f"model {model_uri!r} cannot be resolved: {error.message}") from None
    folder = local / "extra_files" if (local / "extra_files").is_dir() else local
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"model {model_uri!r} is not a vitflow ViT: {', '.join(missing)} missing in {folder}")
    config = ViTConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    try:
        state_dict = load_weights_only(folder / WEIGHTS_FILE)  # a downloaded file: never unpickle code from it
    except ValueError as error:
        raise ValueError(f"model {model_uri!r}: {error}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"model {model_uri!r}: {WEIGHTS_FILE} is not a state dict of tensors")
    class_names = json.loads((folder / CLASSES_FILE).read_text())
    preprocessing = json.loads((folder / PREPROCESSING_FILE).read_text()) if (folder / PREPROCESSING_FILE).is_file() else {}
    return PlainModel(config=config, state_dict=state_dict, class_names=class_names, source_uri=model_uri,
                      preprocessing=preprocessing)
