"""The embedded Ray a local workflow (or stage command) starts for itself, and what a killed driver left.

``ray.init()`` on a machine starts a head node whose processes (GCS, raylet, dashboard, their agents)
belong to the driver. A driver killed with SIGKILL cannot shut them down: some outlive it, and a second
local Ray beside them breaks Ray Train (its placement-group cleaner talks to the wrong State API). So each
working directory gets its own Ray temp folder, and a driver:

- takes the working directory's driver lock (a PID file beside that folder): a second driver on the same
  workflow is refused while the first is alive, and a dead driver's lock is taken over;
- before starting Ray, stops the processes a dead driver left behind, found by that temp folder on their
  command line (only those: never ``ray stop``, which stops every Ray on the machine);
- starts a new head with ``address="local"`` (never attaching to a leftover) in that temp folder.

Linux ``/proc`` is how processes are found; on other systems the reaping step finds nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path


class DriverBusyError(RuntimeError):
    """Another live driver runs the same workflow (same working directory)."""


def temp_root(workdir: str | Path) -> Path:
    """Ray's temp folder for ``workdir``: short (AF_UNIX socket paths end at 107 bytes) and stable, so a
    rerun finds what a killed driver left there."""
    digest = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"vitflow-ray-{digest}"


def lock_path(workdir: str | Path) -> Path:
    return temp_root(workdir).with_name(temp_root(workdir).name + ".driver.pid")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/status")
    with contextlib.suppress(OSError):  # a zombie is dead for our purposes
        if "\nState:\tZ" in status.read_text():
            return False
    return True


def processes_under(root: str | Path) -> list[int]:
    """PIDs of processes whose command line names ``root`` (a Ray temp folder): GCS, raylet, dashboard,
    agents, log monitor. Ray's workers rename themselves (``ray::...``) and exit when their raylet dies."""
    needle = str(root)
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid != os.getpid() and needle in _cmdline(pid):
            found.append(pid)
    return found


def reap(root: str | Path, grace_s: float = 10.0) -> list[int]:
    """Stop the processes a dead driver's Ray left under ``root``: SIGTERM, then SIGKILL after
    ``grace_s``. Returns the PIDs found."""
    pids = processes_under(root)
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        if not any(_alive(pid) for pid in pids):
            break
    return pids


def settle(root: str | Path, wait_s: float = 10.0) -> list[int]:
    """After ``ray.shutdown()`` of a head started in ``root``: wait up to ``wait_s`` for the processes that
    outlive it (the dashboard and runtime-env agents notice their raylet is gone and exit on their own, in
    about two seconds), then stop what is left, so a driver leaves no Ray process behind when it returns.
    Returns the PIDs that had to be stopped."""
    deadline = time.monotonic() + wait_s
    while processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    return reap(root, grace_s=5.0)


@contextlib.contextmanager
def driver_lock(workdir: str | Path) -> Iterator[bool]:
    """Hold ``workdir``'s driver lock for the block. Yields True when a previous driver died holding it
    (its work may need resuming). Raises :class:`DriverBusyError` when a live one holds it."""
    path = lock_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    took_over = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                raise DriverBusyError(
                    f"another vitflow driver (pid {holder}) is running the workflow in {Path(workdir).resolve()}; "
                    f"wait for it or stop it (its lock: {path})") from None
            took_over = True
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    try:
        yield took_over
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if int(path.read_text().strip()) == os.getpid():
                path.unlink()


# A custom resource vitflow's own Ray declares (a cluster declares it on its head node, see cluster.yaml):
# what a trial of several workers holds while its Ray Train workers hold the CPUs (workflows/stages/finetune.py).
TRIAL_DRIVER_RESOURCE = "vitflow_trial_driver"


@contextlib.contextmanager
def embedded_ray(workdir: str | Path, *, address: str | None = None, num_cpus: int | None = None,
                 resources: Mapping[str, float] | None = None) -> Iterator[bool]:
    """Ray for the block: the one already initialised in this process (yields False), the cluster at
    ``address`` or ``RAY_ADDRESS`` (a Ray Jobs driver), else a local head of this working directory's own,
    after reaping a killed predecessor's (yields True: started here, shut down after).

    With the dashboard: Ray Train V2's placement-group cleaner asks its State API whether a run's
    controller died (Tune's ASHA stops trials); without it their CPUs are never freed.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    # A loaded machine can take longer than Ray Train's 60 s default to start a worker group.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster (a Ray Jobs driver on one has RAY_ADDRESS): that cluster's Ray
        ray.init(address=address, logging_level="WARNING")
        try:
            yield True
        finally:
            ray.shutdown()
        return
    root = temp_root(workdir)
    with driver_lock(workdir):
        left = reap(root)
        if left:
            print(f"stopped {len(left)} Ray process(es) a killed vitflow driver left behind in {root}", flush=True)
        ray.init(address="local", num_cpus=num_cpus, resources=dict(resources or {}), include_dashboard=True,
                 _temp_dir=str(root), logging_level="WARNING")
        try:
            yield True
        finally:
            ray.shutdown()
            settle(root)
