"""How a command ends on a user mistake: one line on stderr naming the input and the problem, and a
non-zero exit code (2 for bad input, 1 for a failure the same command can get past once fixed); never a
traceback."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """End the command with a clear message (no traceback) and a non-zero exit code."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)
