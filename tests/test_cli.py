"""The `vitflow` command: the installed console script as users run it (a real subprocess), and its commands' output
and exit codes (in-process, ``tests.cli``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.cli import run_vitflow


def vitflow(*args: str, timeout: float = 300, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("vitflow") or str(Path(sys.executable).parent / "vitflow")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_help_lists_the_commands():
    result = vitflow("--help")
    assert result.returncode == 0, result.stderr
    for command in ("model", "recipe", "shard", "run", "validate", "pretrain", "finetune", "evaluate", "submit", "ui",
                    "serve", "export"):
        assert command in result.stdout


def test_model_describe_reports_size_and_flops():
    result = run_vitflow("model", "describe", "B/16", "--image-size", "384")
    assert result.returncode == 0, result.stderr
    assert "ViT-B/16 @ 384x384" in result.stdout and "86.9 M parameters" in result.stdout
    assert "GFLOPs/image" in result.stdout


def test_user_mistakes_end_without_a_traceback():
    result = run_vitflow("model", "describe", "Q/16")
    assert result.returncode == 2
    assert "unknown model size 'Q'" in result.stderr and "Traceback" not in result.stderr
    result = run_vitflow("model", "describe", "B/16", "--image-size", "200")
    assert result.returncode == 2 and "not divisible by patch_size 16" in result.stderr
    result = run_vitflow("run", "/nonexistent/spec.yaml")
    assert result.returncode == 2 and "/nonexistent/spec.yaml" in result.stderr and "Traceback" not in result.stderr
