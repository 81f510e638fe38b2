"""The MLflow UI on a vitflow store: ``mlflow server`` over the embedded SQLite store (runs and registry)
and its artifact folder, kept small (one worker, no job execution) and bound to localhost by default."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ARTIFACTS_FOLDER = "mlartifacts"  # next to mlflow.db: where workflows.tracking.ensure_experiment puts artifacts


def sqlite_path(tracking_uri: str) -> Path:
    if not tracking_uri.startswith("sqlite:///"):
        raise ValueError(f"{tracking_uri}: expected an embedded store, sqlite:///PATH/mlflow.db "
                         "(a tracking server has its own UI: open its address)")
    return Path(tracking_uri.removeprefix("sqlite:///"))


def default_artifacts(tracking_uri: str) -> Path:
    return sqlite_path(tracking_uri).resolve().parent / ARTIFACTS_FOLDER


def server_command(tracking_uri: str, artifacts: Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    database = sqlite_path(tracking_uri).resolve()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{database}",
        # Artifacts of new experiments go here, proxied by the server; existing runs keep their own
        # (file://) locations, which this server reads directly.
        "--artifacts-destination", str(artifacts.resolve()),
        "--host", host, "--port", str(port),
        "--workers", "1",  # the defaults start 13 processes and 2.3 GB; one worker is enough for a UI
    ]


def server_env() -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job-runner processes beside the UI
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
