"""What a workflow or stage needs, checked before any work starts: its inputs exist, the tracking server
and the Ray cluster answer, and the models it names are in the store.

Each check takes seconds at most. Without them a typo costs minutes: MLflow's HTTP client retries an
unreachable server with growing pauses, and ``ray.init`` waits for a GCS that is not there. Every
problem names the key (or option) it comes from, so the message alone says what to fix.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from workflows import tracking
from workflows.spec import WorkflowSpec

PROBE_TIMEOUT_S = 5.0


class PreflightError(ValueError):
    """An input, a server or a model the work needs is missing, unreachable or refuses us."""


def check_workflow(spec: WorkflowSpec, tracking_uri: str, ray_address: str | None,
                   storage_path: str | None = None) -> None:
    """Everything :class:`workflows.runner.WorkflowRunner` needs before it starts Ray or opens a run.
    The tracking URI, storage path and Ray address come from the spec or, on a cluster, the environment:
    errors name whichever gave them."""
    check_sources(spec)
    check_storage(spec, storage_path)
    check_tracking(tracking_uri, key="tracking.uri" if spec.tracking.uri else "MLFLOW_TRACKING_URI")
    if ray_address:
        check_ray(ray_address, key="ray.address" if spec.ray.address else "RAY_ADDRESS")
    check_models(spec, tracking_uri)


def check_sources(spec: WorkflowSpec) -> None:
    sources = [(f"preprocess.{name}", stage.source) for name, stage in spec.preprocess.items()]
    sources += [(f"predict.{name}", stage.source) for name, stage in spec.predict.items()]
    for key, source in sources:
        if "://" not in source and not Path(source).exists():
            raise PreflightError(f"{key}.source: {source}: no such file or folder")
    for name, stage in spec.predict.items():
        if stage.out and "://" not in stage.out and Path(stage.out).is_dir():
            raise PreflightError(f"predict.{name}.out: {stage.out}: is a folder; give the Parquet file to write")


def check_storage(spec: WorkflowSpec, storage_path: str | None) -> None:
    """Every object-store location must be reachable with this environment's credentials and its bucket
    must exist (a missing bucket would otherwise surface minutes later, as a failed task or a Ray Train
    controller that dies at start); a corpus in a store must be there. Local folders are made as needed."""
    from pipeline.storage import Location, StorageError, is_uri

    locations = [(f"preprocess.{name}.source", stage.source, True) for name, stage in spec.preprocess.items()]
    locations += [(f"preprocess.{name}.out", stage.out, False) for name, stage in spec.preprocess.items()]
    locations += [(f"predict.{name}.source", stage.source, True) for name, stage in spec.predict.items()]
    locations += [(f"predict.{name}.out", stage.out, False) for name, stage in spec.predict.items()]
    locations.append(("storage_path" if spec.storage_path else "VITFLOW_STORAGE", storage_path, False))
    for key, uri, must_exist in locations:
        if not uri or not is_uri(uri):
            continue
        try:
            location = Location(uri)
            location.check_bucket()
            if must_exist and not location.exists():
                raise PreflightError(f"{key}: {uri}: no such object or prefix in the store")
        except StorageError as error:
            raise PreflightError(f"{key}: {error}") from None


def check_tracking(tracking_uri: str, *, key: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """An HTTP tracking server must answer within ``timeout_s`` and accept this environment's credentials
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, as MLflow's client sends them).
    Local stores (sqlite, folders) need no check."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests

    from workflows.tracking import TrackingUnavailable

    base = tracking_uri.rstrip("/")
    try:
        # Any answer will do here (a basic-auth server serves /health to anyone).
        requests.get(f"{base}/health", timeout=timeout_s, **_tls())
        answer = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                              timeout=timeout_s, **_credentials(), **_tls())
    except requests.RequestException as error:
        raise TrackingUnavailable(
            f"{key} {tracking_uri}: the MLflow tracking server does not answer ({type(error).__name__} within "
            f"{timeout_s:.0f} s); is it running, and is the address right?") from None
    if answer.status_code == 401:
        given = [name for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
                 if os.environ.get(name)]
        raise PreflightError(
            f"{key} {tracking_uri}: the server refused the credentials (HTTP 401); set MLFLOW_TRACKING_USERNAME "
            f"and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment or ~/.mlflow/credentials "
            f"({'set now: ' + ', '.join(given) if given else 'none is set in the environment'})")


def _credentials() -> dict:
    """What MLflow's REST client sends, resolved its own way: username and password from the environment
    or ``~/.mlflow/credentials`` (basic auth), else ``MLFLOW_TRACKING_TOKEN`` (bearer)."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if creds.username and creds.password:
        return {"auth": (creds.username, creds.password)}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"headers": {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}}
    return {}


def _tls() -> dict:
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return {"verify": False}
    if os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        return {"verify": os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]}
    return {}


def check_ray(address: str, *, key: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Something must accept a connection at a Ray address (GCS ``host:port``, ``ray://host:port``);
    ``auto`` and ``local`` are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    default_port = {"ray": 10001, "gcs": 6379, "http": 80, "https": 443}.get(parts.scheme)
    try:
        host, port = parts.hostname, parts.port or default_port
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or not port:
        raise PreflightError(f"{key} {address}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto)")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        raise PreflightError(f"{key} {address}: nothing answers there ({error.strerror or type(error).__name__}); "
                             "is the Ray cluster up, and is the address right?") from None


def check_models(spec: WorkflowSpec, tracking_uri: str) -> None:
    """The model URIs the spec names (syntax was checked at load) must exist in the store, and a registered
    pre-trained model must take the search's resolutions (the spec checks a pre-train stage's own)."""
    finetunes = spec.finetune_keys()
    references = [(f"{key}.pretrained", section.pretrained) for key, section in finetunes.items()]
    references.append(("evaluate.model", spec.evaluate.model if spec.evaluate else None))
    for key, uri in references:
        if uri is None or not uri.startswith(("models:/", "runs:/")):
            continue  # a local folder: its existence was checked at load
        if tracking.missing_store(tracking_uri) is not None:
            raise PreflightError(f"{key}: {uri} does not exist: the tracking store {tracking_uri} has no models yet")
        if not tracking.model_exists(tracking_uri, uri):
            raise PreflightError(f"{key}: {uri} does not exist in the tracking store {tracking_uri}")
    for key, section in finetunes.items():
        if section.pretrained is not None:
            check_resolutions(section.search.image_size, section.pretrained, tracking_uri, key=key)


def check_resolutions(image_sizes: list[int], pretrained: str, tracking_uri: str, key: str = "finetune") -> None:
    """Every fine-tuning resolution must be a whole number of the pre-trained model's patches. Reads the
    model's logged config (one small file), not its weights."""
    try:
        patch = tracking.logged_model_config(tracking_uri, pretrained).patch_size
    except ValueError as error:
        raise PreflightError(f"{key}.pretrained: {error}") from None
    bad = [size for size in image_sizes if size % patch]
    if bad:
        raise PreflightError(f"{key}.search.image_size: {bad} not divisible by the patch size {patch} of the "
                             f"pre-trained model {pretrained}")
