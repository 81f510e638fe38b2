"""`vitflow` commands run inside the test's own process, through Typer's test runner (Click's ``CliRunner``):
the same application object, arguments, exit codes and output as the console script, without starting a
Python that imports torch, MLflow and Ray again (~7 s a command on a 2-core Xeon; the suite ran ~100).

For commands that end before any Ray or training process starts: input errors, validation, unreachable
servers, shard verification, help. A command a test kills, or one that starts Ray and training, still runs
as a real subprocess (``tests.faults.conftest.vitflow``); ``tests/test_cli.py`` runs the installed console
script itself.

An exception that escapes a command is a traceback a user would have seen: its formatted traceback is
appended to ``stderr``, so the tests' "no traceback" checks catch it as they would in a subprocess."""

from __future__ import annotations

import os
import subprocess
import traceback
from collections.abc import Mapping
from pathlib import Path

from typer.testing import CliRunner


def run_vitflow(*args: str, cwd: str | Path | None = None,
                env: Mapping[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``vitflow ARGS`` in this process, in ``cwd`` (restored after), with ``env`` set for the command only
    (a value ``None`` unsets a variable). Returns what ``subprocess.run(..., capture_output=True, text=True)``
    would."""
    from workflows.cli.main import app

    before = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, [str(arg) for arg in args], env=dict(env) if env else None,
                                    catch_exceptions=True)
    finally:
        os.chdir(before)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["vitflow", *map(str, args)], result.exit_code, result.stdout, stderr)
