"""Sharding on an autoscaling Ray cluster (``min_workers: 0``, as in cluster.yaml): the shard tasks queued
beyond the head's CPUs are demand that Ray's own autoscaler acts on, and the worker node it launches
while sharding runs takes shard tasks. The bytes are those of an in-process run."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import ShardConfig, write_shards
from pipeline.sources import Record, Rejected, Scan, Source, open_source
from tests.conftest import REPO_ROOT
from tests.pipeline.test_shards import all_files
from tests.workflows.servers import (
    STARTUP_S,
    LocalCluster,
    NodeResources,
    processes_mentioning,
)

OPEN = "open"
CONFIG = ShardConfig(max_shard_samples=40)  # cifar_source: 16 train and 8 test shards


@dataclass(frozen=True)
class GatedSource:
    """A real source whose reads first leave a file named after the node running them, then wait for
    ``gate/open``. It holds the shard tasks that started until the test has seen where they ran: the
    corpus is sharded in about a second, a node takes several to start."""

    inner: Source
    gate: str

    @property
    def uri(self) -> str:
        return self.inner.uri

    def scan(self) -> Scan:
        return self.inner.scan()

    def describe(self) -> dict:
        return self.inner.describe()

    def read(self, records: Sequence[Record]) -> Iterator[tuple[Record, bytes | Rejected]]:
        import ray

        gate = Path(self.gate)
        (gate / f"{ray.get_runtime_context().get_node_id()}.{uuid.uuid4().hex}").touch()
        while not (gate / OPEN).exists():
            time.sleep(0.05)
        yield from self.inner.read(records)


def nodes_that_ran_tasks(gate: Path) -> set[str]:
    return {marker.name.split(".")[0] for marker in gate.iterdir() if marker.name != OPEN}


def shard_behind_gate(source: str, out: str, gate: str, address: str) -> None:
    """The driver, in a process of its own: Ray keeps a process's auth mode and token for its lifetime."""
    write_shards(GatedSource(open_source(source), gate), out, CONFIG, address=address, progress=False)


@pytest.mark.slow
def test_a_node_the_autoscaler_adds_while_sharding_takes_shard_tasks(cifar_source, tmp_path):
    reference = write_shards(cifar_source, tmp_path / "inline", CONFIG, workers=0, progress=False)
    gate, out = tmp_path / "gate", tmp_path / "out"
    gate.mkdir()
    cpu_node = {"resources": {"CPU": 1, "object_store_memory": 300 * 1024**2}, "node_config": {},
                "min_workers": 0, "max_workers": 1}
    cluster = LocalCluster(tmp_path / "cluster", nodes=(NodeResources(num_cpus=1),), worker_types={"cpu1": cpu_node})
    with cluster, open(tmp_path / "driver.log", "w+") as log:
        (head,) = [node["node_id"] for node in cluster.alive_nodes()]  # nothing but the head until demand
        code = "import sys; from tests.pipeline.test_scaleout import shard_behind_gate; shard_behind_gate(*sys.argv[1:])"
        driver = subprocess.Popen([sys.executable, "-c", code, str(cifar_source), str(out), str(gate), cluster.address],
                                  cwd=REPO_ROOT, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        try:  # the gate opens once a task runs on a node other than the head (or the driver ends, or time is up)
            deadline = time.monotonic() + STARTUP_S
            while nodes_that_ran_tasks(gate) <= {head} and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            (gate / OPEN).touch()
            try:
                driver.wait(timeout=STARTUP_S)
            except subprocess.TimeoutExpired:
                driver.kill()
                driver.wait()
        nodes = nodes_that_ran_tasks(gate)
        alive = {node["node_id"] for node in cluster.alive_nodes()}
        log.seek(0)
        assert driver.returncode == 0, log.read()[-4000:]
    assert processes_mentioning(str(cluster.temp_dir)) == []  # the launched node is stopped with the cluster

    assert head in nodes and len(alive) == 2, f"the autoscaler launched no node: ran on {nodes}, alive {alive}"
    assert nodes == alive, f"no shard task ran on the node that joined: ran on {nodes}, alive {alive}"
    assert all_files(out) == all_files(reference.info.root)
