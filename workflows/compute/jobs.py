"""Submitting vitflow to a running Ray cluster through the Ray Jobs API (the head's dashboard, port 8265).

A job ships the project (the checkout this module runs from, minus virtualenvs, VCS data, runs and
data) together with the spec as its ``working_dir`` and runs ``vitflow <command> <spec>`` in it on the
head node; Ray sets ``RAY_ADDRESS`` for the job, so the driver's ``ray.init()`` joins that cluster.
Paths inside the spec are read on the cluster: use absolute paths or URIs the cluster can see (s3://...).
A spec that ``extends`` others is shipped as one file, its chain merged in.

Every call to the cluster is bounded: an unreachable address fails within ``connect_timeout_s``
instead of hanging (Ray's client sends its requests without a time-out).
"""

from __future__ import annotations

import asyncio
import fnmatch
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from workflows import tags as tag

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SPEC_FOLDER = "_vitflow_submit"  # where the spec lands inside the shipped working_dir
# Never shipped: environments, VCS data, caches, local runs, stores and data. Gitignore syntax, as Ray
# reads it: a bare name matches anywhere, a leading "/" anchors at the project root.
EXCLUDES = (
    ".venv", "venv", ".git", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache",
    "/benchmarks/.work", "/mlruns", "/mlartifacts", "/mlflow.db", "/vitflow-runs", "/runs", "/data", "/build", "/dist",
)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class EntryCommand(str, Enum):
    """The vitflow command a job runs on the cluster."""

    run = "run"  # a whole workflow spec
    pretrain = "pretrain"  # one pre-training configuration


class ClusterError(Exception):
    """The cluster cannot be reached, refuses the request, or does not know the job."""


@dataclass(frozen=True)
class JobState:
    job_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str
    entrypoint: str


def normalise_address(address: str) -> str:
    if address.startswith("ray://"):
        raise ClusterError(f"{address}: the Jobs API needs the dashboard's HTTP address, e.g. http://HEAD:8265")
    return (address if "://" in address else f"http://{address}").rstrip("/")


def connect(address: str, connect_timeout_s: float = 10.0) -> JobSubmissionClient:
    """A Jobs API client for ``address``, after a bounded check that the dashboard answers.

    Token authentication follows Ray's own settings (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``)."""
    import requests

    address = normalise_address(address)
    try:
        requests.get(f"{address}/api/version", timeout=(connect_timeout_s, connect_timeout_s))
    except requests.RequestException as error:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} ({type(error).__name__}); is the cluster up and the "
            f"port forwarded (`ray dashboard cluster.yaml`)?"
        ) from None
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise ClusterError(f"{address} refused the request: {error}") from None
    except (ConnectionError, RuntimeError) as error:
        raise ClusterError(f"{address}: {error}") from None


def ship(spec: Path, folder: Path, project_root: Path | None = PROJECT_ROOT) -> str:
    """Fill ``folder`` with what a job needs: the project (when this runs from a checkout, so the
    cluster runs exactly this code) and the spec. Returns the spec's path inside ``folder``.

    A spec that extends others is shipped as one self-contained file: the merged document, its local
    paths as resolved here (the files it extends are not shipped). Any other spec is copied as it is.
    Raises ``SpecError`` for a spec that cannot be read (bad YAML, a missing base)."""
    # Imported here, not at the top: the spec's models import torch, which `vitflow status` need not wait for.
    from workflows.spec import spec_document

    if project_root is not None and (project_root / "pyproject.toml").is_file():
        shutil.copytree(project_root, folder, ignore=_excluded(project_root), dirs_exist_ok=True, symlinks=True)
    target = folder / SPEC_FOLDER / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    document, bases = spec_document(spec)
    if bases:
        header = f"# {spec.name}, merged by `vitflow submit` with the specs it extends: {', '.join(map(str, bases))}\n"
        target.write_text(header + yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    else:
        shutil.copyfile(spec, target)
    return f"{SPEC_FOLDER}/{spec.name}"


def _excluded(root: Path) -> Callable[[str, list[str]], set[str]]:
    """``copytree``'s ignore function for :data:`EXCLUDES`: names anywhere, paths from ``root``."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        relative = Path("/") / Path(directory).relative_to(root)
        return {name for name in names for pattern in EXCLUDES
                if (relative / name).as_posix() == pattern or ("/" not in pattern and fnmatch.fnmatch(name, pattern))}

    return ignore


def submit(
    client: JobSubmissionClient,
    spec: Path,
    command: EntryCommand = EntryCommand.run,
    *,
    ship_project: bool = True,
    verbose: bool = False,
) -> str:
    """Submit ``vitflow <command> <spec> [--verbose]`` with the project and spec as the job's working_dir; return the job id."""
    with tempfile.TemporaryDirectory(prefix="vitflow-submit-") as staging:
        relative_spec = ship(spec, Path(staging), PROJECT_ROOT if ship_project else None)
        entrypoint = f"vitflow {command.value} {shlex.quote(relative_spec)}" + (" --verbose" if verbose else "")
        # Ray uploads the folder before submit_job returns, so the staging copy can go afterwards.
        return client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": staging, "excludes": list(EXCLUDES)},
            metadata={tag.SPEC: spec.name, tag.COMMAND: command.value},
        )


def job_state(client: JobSubmissionClient, job_id: str) -> JobState:
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as error:  # Ray's client reports HTTP errors (404: no such job) as RuntimeError
        raise ClusterError(f"job {job_id}: {error}") from None
    return JobState(job_id=job_id, status=str(info.status.value if hasattr(info.status, "value") else info.status),
                    message=info.message or "", entrypoint=info.entrypoint)


def logs(client: JobSubmissionClient, job_id: str) -> str:
    job_state(client, job_id)  # a clear error for an unknown job
    return client.get_job_logs(job_id)


def follow(client: JobSubmissionClient, job_id: str, write: Callable[[str], object] = sys.stdout.write,
           poll_s: float = 2.0) -> JobState:
    """Stream the job's logs until it ends; return its final state."""
    job_state(client, job_id)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as error:  # the log stream broke off: fall back to polling the status
        write(f"\n[vitflow] log stream interrupted ({error}); waiting for the job to end\n")
    while (state := job_state(client, job_id)).status not in TERMINAL:  # the stream may close just before
        time.sleep(poll_s)
    return state
