"""Runs: where they are stored, starting, finding, reopening and ending them, their params, tags and
artifacts, and whether the tracking server answers at all.

Every MLflow client of the package is made by :func:`client`, which applies :data:`CLIENT_DEFAULTS`
first; MLflow reads those variables when it sends a request, so every process that talks to MLflow
(the driver, Ray workers, Tune trials) gets the same bounded network behaviour.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from workflows import tags as tag

# Bounded network behaviour: a tracking server that is down must not hang training for minutes per call.
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def client_defaults() -> None:
    """Set :data:`CLIENT_DEFAULTS` in this process's environment, keeping any value already set (a
    person's own timeout wins). Idempotent; called wherever the package makes a client or enters
    MLflow's fluent API, never at import."""
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def client(tracking_uri: str, *, registry: bool = False) -> MlflowClient:
    """An MLflow client of ``tracking_uri`` (also its model registry when ``registry``), with the
    client defaults applied."""
    client_defaults()
    return MlflowClient(tracking_uri, registry_uri=tracking_uri) if registry else MlflowClient(tracking_uri)


@contextlib.contextmanager
def _using(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API with ``tracking_uri`` for the block only. ``mlflow.set_tracking_uri`` also
    exports MLFLOW_TRACKING_URI to the environment, which would leak into whatever runs next in this
    process (and its children): the previous state is restored on the way out."""
    client_defaults()
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


def missing_store(tracking_uri: str) -> Path | None:
    """The file of an embedded store (``sqlite:///PATH``) that does not exist yet, else None: MLflow would
    create an empty store there on first use, e.g. just to look a model up in it."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return None if path.is_file() else path


def ensure_experiment(name: str, tracking_uri: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created on first use (with its artifact location: Ray's MLflow callback
    cannot choose one, so vitflow creates experiments itself)."""
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if artifact_location is None and tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return mlflow_client.create_experiment(name, artifact_location=artifact_location)


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
    mlflow_client = client(tracking_uri)
    experiment_id = ensure_experiment(experiment, tracking_uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[tag.PARENT_RUN] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run RUNNING again: a resumed stage keeps logging into the run it started."""
    client(tracking_uri).update_run(run_id, status="RUNNING")


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def find_run(tracking_uri: str, experiment: str, tags: Mapping[str, str], statuses=("RUNNING", "FINISHED", "FAILED", "KILLED")) -> str | None:
    """The newest run of ``experiment`` carrying all ``tags`` (used to resume a stage's run)."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = mlflow_client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=20)
    runs = [run for run in runs if run.info.status in statuses]
    return runs[0].info.run_id if runs else None


def runs_with_tags(tracking_uri: str, experiment: str, tags: Mapping[str, str], status: str | None = None) -> list:
    """Runs of ``experiment`` carrying all ``tags`` (newest first), optionally only in ``status``."""
    mlflow_client = client(tracking_uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return []
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    if status:
        query += f" and attributes.status = '{status}'"
    return mlflow_client.search_runs([found.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])


def run_status(tracking_uri: str, run_id: str) -> str:
    return client(tracking_uri).get_run(run_id).info.status


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """The latest value of each metric of a run."""
    return dict(client(tracking_uri).get_run(run_id).data.metrics)


def last_step(tracking_uri: str, run_id: str, key: str) -> int:
    history = client(tracking_uri).get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def run_url(tracking_uri: str, experiment: str, run_id: str) -> str:
    """Where a person sees the run: the tracking server's UI, or the one `vitflow ui` starts."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    found = client(tracking_uri).get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else "0"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


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


def run_params(tracking_uri: str, run_id: str) -> dict[str, str]:
    """A run's params as logged (flat strings, ``train.optim.lr``)."""
    return dict(client(tracking_uri).get_run(run_id).data.params)


def log_params(tracking_uri: str, run_id: str, params: Mapping) -> None:
    mlflow_client = client(tracking_uri)
    existing = mlflow_client.get_run(run_id).data.params
    fresh = {k: v for k, v in flatten_params(params).items() if k not in existing}  # params are write-once
    items = list(fresh.items())
    for start in range(0, len(items), 100):  # MLflow's batch limit
        mlflow_client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in items[start : start + 100]])


def set_tags(tracking_uri: str, run_id: str, tags: Mapping[str, object]) -> None:
    mlflow_client = client(tracking_uri)
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, str(value))


def log_text(tracking_uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(tracking_uri).log_text(run_id, text, artifact_file)


def log_artifacts(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    mlflow_client = client(tracking_uri)
    for path in paths:
        mlflow_client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_dataset(tracking_uri: str, run_id: str, path: str, *, name: str, digest: str, context: str) -> None:
    """Record a shard dataset as the run's input (``mlflow.data``), identified by its fingerprint."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = resolve_dataset_source(path if "://" in path else str(Path(path).resolve()))
    dataset = MetaDataset(source=source, name=name, digest=digest[:36])
    client(tracking_uri).log_inputs(
        run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    )


# --- an unreachable tracking server ------------------------------------------------------------------


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
