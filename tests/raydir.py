"""A short folder for a test's local Ray: Ray puts its AF_UNIX sockets under it, whose paths end at 107
bytes (pytest's temp dirs, longer still under pytest-xdist's workers, push them past it)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def short_ray_tmpdir() -> Iterator[str]:
    """A new folder under /tmp, also RAY_TMPDIR for the block (so CLI runs the test starts use it too);
    RAY_TMPDIR restored and the folder removed afterwards."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    try:
        yield temp
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp, ignore_errors=True)
