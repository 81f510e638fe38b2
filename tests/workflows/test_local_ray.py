"""The embedded Ray's process bookkeeping, on real processes: what a driver stops (and waits for) is found
by its Ray temp folder on the command line, and one workflow directory has one live driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.compute.local_ray import (
    DriverBusyError,
    driver_lock,
    lock_path,
    processes_under,
    reap,
    settle,
)


def start(root: Path, setup: str = "", then: str = "time.sleep(300)") -> subprocess.Popen:
    """A process with ``root`` on its command line, like Ray's agents; returns once it runs (its command
    line is set only when its exec has finished, after Popen returns)."""
    child = subprocess.Popen([sys.executable, "-c", f"import signal, time\n{setup}\nprint('up', flush=True)\n{then}",
                              f"--temp-dir={root}"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "up\n"
    return child


def test_settle_waits_for_processes_that_exit_and_stops_the_rest(tmp_path):
    root = tmp_path / "ray-root"
    leaving = start(root, then="time.sleep(1)")  # like an agent whose raylet is gone
    staying = start(root)
    try:
        assert sorted(processes_under(root)) == sorted([leaving.pid, staying.pid])
        assert settle(root, wait_s=5.0) == [staying.pid]  # waited for the first, then stopped the other
        assert leaving.wait(timeout=10) == 0  # it exited on its own, not signalled
        assert staying.wait(timeout=10) == -15  # SIGTERM: the polite stop
        assert processes_under(root) == []
    finally:
        for child in (leaving, staying):
            child.kill()
            child.wait()


def test_reap_kills_what_ignores_sigterm(tmp_path):
    root = tmp_path / "ray-root"
    stubborn = start(root, "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    try:
        assert reap(root, grace_s=0.5) == [stubborn.pid]
        assert stubborn.wait(timeout=10) == -9
        assert processes_under(root) == []
    finally:
        stubborn.kill()
        stubborn.wait()


def test_one_live_driver_per_workflow_directory(tmp_path):
    workdir = tmp_path / "work"
    with driver_lock(workdir) as took_over:
        assert took_over is False and lock_path(workdir).read_text() == str(os.getpid())
        holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        lock_path(workdir).write_text(str(holder.pid))  # another driver, alive, holds the lock
        with pytest.raises(DriverBusyError, match=rf"pid {holder.pid}.*{workdir.name}"):
            with driver_lock(workdir):
                pass
    finally:
        holder.kill()
        holder.wait()
    with driver_lock(workdir) as took_over:  # its driver died holding it: taken over, with a resume hint
        assert took_over is True
    assert not lock_path(workdir).exists()  # released by its holder
