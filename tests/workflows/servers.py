"""Real servers for the workflow tests, started as processes and stopped whatever happens:
a multi-node Ray cluster on one machine (one ``ray start --block`` per node, or worker nodes that the
head's own autoscaler launches) and an MLflow server.

Only processes these helpers started are ever stopped, by their ids: never ``ray stop`` (it stops
every Ray on the machine, other users' clusters included). Each Ray node runs ``ray start --block``
in its own process group: SIGTERM makes it shut its node down, and its reaper kills the group;
anything left afterwards is found by the cluster's unique temp dir in its command line and killed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.objectstore import free_port
from workflows.compute.local_ray import reap

VENV_BIN = Path(sys.executable).parent
# How long a server gets to answer after it starts: a fresh SQLite store migrates first, and a loaded
# 2-core machine runs at a small fraction of its idle speed (the start loops fail fast if it dies).
STARTUP_S = 300


@dataclass(frozen=True)
class NodeResources:
    num_cpus: int = 1
    memory: int = 3 * 1024**3  # logical, for scheduling; Ray's memory monitor watches the machine
    object_store_memory: int = 300 * 1024**2


@dataclass
class LocalCluster:
    """A Ray cluster of ``len(nodes)`` raylets on this machine; the first is the head (GCS, dashboard,
    Jobs API). Every command for it (``ray start``, jobs, ``vitflow submit``) runs with :attr:`env`:
    token authentication on, with this cluster's own token, so no command depends on
    ``~/.ray/auth_token`` or on another cluster's settings."""

    root: Path
    nodes: tuple[NodeResources, ...] = (NodeResources(), NodeResources())
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # every node's and command's (e.g. object-store keys)
    # Autoscaled worker node types ({"cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
    # "max_workers": 1}}): the head runs Ray's autoscaler with its fake multi-node provider, which starts
    # a real raylet on this machine where a cloud provider would start a VM. Its demand is Ray's own:
    # tasks and actors waiting for resources.
    worker_types: Mapping[str, dict] | None = None

    temp_dir: Path = field(init=False)
    lost: set[int] = field(default_factory=set)  # nodes whose raylet was killed (kill_raylet)

    def __post_init__(self) -> None:
        # Ray's sockets live under temp_dir/nodeN/session_<date>_<pid>/sockets and AF_UNIX paths end at
        # 107 bytes: pytest's temp paths are too long. A short folder in /tmp; its logs go to `root` at the end.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vf-ray-"))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `vitflow` for job entrypoints
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_TMPDIR": str(self.temp_dir / "node0"),  # where the head records the cluster's address
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "10",  # a test cluster has nothing worth 30 s of draining
            # Ray Train's 60 s default for a worker group to start is short on a loaded 2-core machine (the
            # local driver sets the same; set here so no test depends on another having run first).
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            **self.extra_env,
        }

    def node_home(self, index: int) -> Path:
        """A node's own working folder (its raylet's cwd): nodes share no folder, as on separate machines."""
        return self.root / f"node{index}-home"

    def start(self, timeout_s: float = 300) -> LocalCluster:  # a loaded 2-core machine is slow to start Ray
        self.root.mkdir(parents=True, exist_ok=True)
        for index, resources in enumerate(self.nodes):
            self._start_node(index, resources)
            if index == 0:
                self._wait(lambda: self.get("/api/version").ok, timeout_s, "the head's dashboard")
        self._wait(lambda: len(self.alive_nodes()) == len(self.nodes), timeout_s, f"{len(self.nodes)} alive nodes")
        return self

    def _start_node(self, index: int, resources: NodeResources) -> None:
        command = [
            str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={resources.num_cpus}", "--num-gpus=0",
            f"--memory={resources.memory}", f"--object-store-memory={resources.object_store_memory}",
            # One temp dir per node, as on separate machines: a shared one would have both nodes unpack
            # a job's working_dir into the same folder, deleting it under the running driver.
            f"--temp-dir={self.temp_dir / f'node{index}'}",
            # Two raylets share one host: every fixed default port (agent 52365, workers 10002+) would clash.
            f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
        ]
        env = self.env
        if index == 0:
            command += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={free_port()}"]
            if self.worker_types:
                command += [f"--autoscaling-config={self._autoscaling_config(resources)}"]
                env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        else:
            command += [f"--address={self.address}"]
        log = open(self.root / f"node-{index}.log", "wb")
        home, temp = self.node_home(index), self.temp_dir / f"node{index}" / "tmp"
        home.mkdir(parents=True, exist_ok=True)
        temp.mkdir(parents=True, exist_ok=True)
        self.processes.append(subprocess.Popen(command, env={**env, "TMPDIR": str(temp)}, cwd=home, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def add_node(self, resources: NodeResources, timeout_s: float = 300) -> int:
        """Start one more worker node (as an autoscaler replacing a lost machine does); its index."""
        index, alive = len(self.nodes), len(self.alive_nodes())
        self.nodes = (*self.nodes, resources)
        self._start_node(index, resources)
        self._wait(lambda: len(self.alive_nodes()) > alive, timeout_s, "the added node")
        return index

    def kill_raylet(self, index: int) -> int:
        """SIGKILL node ``index``'s raylet, as when its machine is lost (its workers die with it); the pid."""
        node_temp = f"{self.temp_dir / f'node{index}'}/"
        (pid,) = [pid for pid in processes_mentioning(node_temp) if "raylet/raylet" in _cmdline(pid)]
        os.kill(pid, signal.SIGKILL)
        self.lost.add(index)
        return pid

    def _autoscaling_config(self, head: NodeResources) -> Path:
        """The cluster launcher's config for Ray's fake multi-node provider (its example.yaml, which the
        wheel does not ship), pointed at this cluster's GCS; launched nodes inherit the head's environment
        (the token, RAY_TMPDIR)."""
        config = {
            "cluster_name": "vitflow-test",
            "max_workers": sum(t.get("max_workers", 0) for t in self.worker_types.values()),
            "provider": {"type": "fake_multinode", "gcs_address": self.address, "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": head.num_cpus}, "node_config": {}, "max_workers": 0},
                **self.worker_types,
            },
            "head_node_type": "ray.head.default",
            "auth": {}, "docker": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 10,
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [],
        }
        path = self.root / "autoscaling.json"
        path.write_text(json.dumps(config))
        return path

    def get(self, path: str, **params) -> requests.Response:
        return requests.get(f"{self.dashboard_url}{path}", params=params, timeout=10,
                            headers={"Authorization": f"Bearer {self.token}"})

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(process.poll() is not None for index, process in enumerate(self.processes) if index not in self.lost):
                raise RuntimeError(f"a Ray node exited while waiting for {what}; see {self.root}/node-*.log")
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"no {what} after {timeout_s:.0f} s; see {self.root}/node-*.log")

    def state(self, resource: str, **filters: str) -> list[dict]:
        """Ray's state API over the dashboard's HTTP endpoint (``/api/v0/nodes``, ``/api/v0/actors``)."""
        params: dict[str, object] = {"detail": "true", "limit": 10_000}
        if filters:
            params.update(filter_keys=list(filters), filter_predicates=["="] * len(filters),
                          filter_values=list(filters.values()))
        response = self.get(f"/api/v0/{resource}", **params)
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [node for node in self.state("nodes") if node["state"] == "ALIVE"]

    def stop(self) -> None:
        """Stop the worker nodes, then the head (each drains first), then kill whatever is left."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid)
                process.wait(timeout=10)
        kill_processes_mentioning(str(self.temp_dir))
        for index in range(len(self.nodes)):
            logs = self.temp_dir / f"node{index}" / "session_latest" / "logs"
            if logs.is_dir():
                shutil.copytree(logs, self.root / f"ray-logs-node{index}", dirs_exist_ok=True,
                                ignore_dangling_symlinks=True)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class MlflowServer:
    """An MLflow server (tracking and UI, or a model's scoring server) run by ``command`` in its own process
    group, on ``port``."""

    command: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    health: str = "/health"  # the path that answers 200 once it serves (`mlflow models serve`: /ping)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MlflowServer:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            deadline = time.monotonic() + STARTUP_S
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the MLflow server exited ({self.process.returncode}); see {self.log_path}")
                try:
                    if requests.get(f"{self.url}{self.health}", timeout=5).ok:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.5)
            raise TimeoutError(f"the MLflow server did not answer in {STARTUP_S} s; see {self.log_path}")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and its uvicorn worker
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _kill_group(self.process.pid)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        _kill_group(self.process.pid)  # a worker that outlived the server


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[int]:
    """Ids of this user's processes whose command line contains ``text`` (a unique temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid == os.getuid() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # exited meanwhile
            continue
    return found


def kill_processes_mentioning(text: str, grace_s: float = 10) -> None:
    """SIGTERM the processes whose command line names ``text``, SIGKILL those left after ``grace_s``, and
    wait until they are gone (the product's own reaper of a killed driver's Ray)."""
    reap(text, grace_s=grace_s)
