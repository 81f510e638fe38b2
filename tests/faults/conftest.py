"""The fault-injection suite's fixtures: the workflow tests' real corpora, shards and local Ray, plus
what the scenarios share (waiting on a condition, running the `vitflow` console script)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.workflows.conftest import local_ray  # noqa: F401  (a fixture, re-exported for this folder)

VITFLOW = str(Path(sys.executable).parent / "vitflow")


def checkpoint_steps(run_dir: Path, folders: str = "checkpoint_*") -> list[int]:
    """Steps of the checkpoints Ray Train has persisted under ``run_dir`` in folders matching ``folders``
    (complete ones only: a folder appears before its file is copied in)."""
    from vit.checkpoint import CHECKPOINT_FILE, load_checkpoint

    steps = []
    for file in run_dir.glob(f"{folders}/{CHECKPOINT_FILE}") if run_dir.is_dir() else []:
        try:
            steps.append(int(load_checkpoint(file)["step"]))
        except Exception:  # being written right now
            continue
    return sorted(steps)


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, every_s: float = 0.5):
    """Poll ``condition`` until it returns something truthy (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def vitflow(*args: str, cwd: Path | None = None, timeout_s: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([VITFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, env=env)
