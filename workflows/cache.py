"""Stage fingerprints and the cache of finished stages, kept in MLflow.

A stage's fingerprint hashes its configuration, its inputs' fingerprints (corpus listing, dataset
fingerprint, model URI) and the code version. A finished stage run carries its fingerprint and its
:class:`~workflows.results.StageResult` as tags; a later execution with the same fingerprint reuses that
result while its output is still valid (shards that verify, a registered model version that exists, a
prediction file that is there).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from workflows import tags as tag
from workflows import tracking
from workflows.results import StageResult


def code_version() -> str:
    """vitflow's version plus the git commit of the checkout it runs from (when it is one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("vitflow")
    except PackageNotFoundError:
        package = "unknown"
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        return f"{package}+g{commit}"
    except (OSError, subprocess.SubprocessError):
        return package


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def corpus_fingerprint(source: str) -> str:
    """A cheap identity of a corpus, local or in an object store: every file's relative path, size and
    modification time (listed, never read)."""
    import pyarrow.fs as pafs

    from pipeline.storage import Location, StorageError

    try:
        root = Location(source)
        top = root.info()
        if top.type == pafs.FileType.NotFound:
            return fingerprint(source)
        listed = [top] if top.type == pafs.FileType.File else \
            root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True))
    except (StorageError, OSError):  # unreachable now: the preflight says so; the source string stands in
        return fingerprint(source)
    digest = hashlib.sha256()
    for info in sorted((i for i in listed if i.type == pafs.FileType.File), key=lambda i: i.path):
        relative = info.base_name if info.path == root.path else info.path[len(root.path) + 1:]
        digest.update(f"{relative}\0{info.size}\0{info.mtime_ns}\n".encode())
    return digest.hexdigest()


class StageCache:
    """The finished stages of one experiment, found by fingerprint. ``force`` names stages never reused."""

    def __init__(self, tracking_uri: str, experiment: str, *, force: set[str], code: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.force = force
        self.code = code

    def lookup(self, stage: str, stage_fingerprint: str) -> StageResult | None:
        if stage in self.force:
            return None
        for run in tracking.runs_with_tags(self.tracking_uri, self.experiment,
                                           {tag.STAGE_FINGERPRINT: stage_fingerprint}, status="FINISHED"):
            stored = run.data.tags.get(tag.RESULT)
            if stored and self.still_valid(result := StageResult.from_json(stored)):
                return result
        return None

    def still_valid(self, result: StageResult) -> bool:
        if result.output_uri:  # a predict stage: its file is still there, and the model it used
            from pipeline.storage import Location, StorageError

            try:
                written = Location(result.output_uri).is_file()
            except (StorageError, OSError):
                return False
            return written and (not result.model_uri or tracking.model_exists(self.tracking_uri, result.model_uri))
        if result.dataset_uri and not result.model_uri:
            from pipeline import verify_shards

            try:
                return verify_shards(result.dataset_uri).ok
            except (OSError, ValueError):
                return False
        if result.model_uri:
            return tracking.model_exists(self.tracking_uri, result.model_uri)
        return True

    def record(self, stage: str, stage_fingerprint: str, result: StageResult) -> None:
        tracking.set_tags(self.tracking_uri, result.run_id, {tag.STAGE_FINGERPRINT: stage_fingerprint,
                                                             tag.RESULT: result.to_json(), tag.STAGE_NAME: stage,
                                                             tag.CODE_VERSION: self.code})

    def run_name(self, workflow: str, stage: str, stage_fingerprint: str) -> str:
        """Deterministic per fingerprint (so a rerun resumes); a forced rerun gets the next free suffix."""
        name = f"{workflow}-{stage}-{stage_fingerprint[:10]}"
        if stage in self.force:
            taken = tracking.runs_with_tags(self.tracking_uri, self.experiment, {tag.STAGE_FINGERPRINT: stage_fingerprint})
            name += f"-r{len(taken)}" if taken else ""
        return name
