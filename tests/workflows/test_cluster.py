"""cluster.yaml against Ray's own schema, and `vitflow submit` on a real 2-node Ray cluster (two raylets
on this machine, sharing no folder: only the object store and the tracking server): pre-training's workers
land on both nodes and survive losing one; a whole workflow survives a killed driver."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pyarrow.fs as pafs
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.workflows.servers import (
    LocalCluster,
    MlflowServer,
    NodeResources,
    free_port,
    processes_mentioning,
)
from vit.checkpoint import CHECKPOINT_FILE
from workflows.compute.jobs import SPEC_FOLDER


def vitflow(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which("vitflow") or str(Path(sys.executable).parent / "vitflow")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env)


def launcher_config(config: dict) -> dict:
    """What `ray up` checks before it contacts the cloud: defaults filled in, then the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_launcher_validation_and_keeps_the_cluster_private():
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    prepared = launcher_config(config)

    nodes = prepared["available_node_types"]
    head = nodes[prepared["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = [node for node in nodes.values() if node["resources"].get("GPU") == 8]
    assert len(gpu_types) == 2 and all(0 == node["min_workers"] < node["max_workers"] for node in gpu_types)
    assert {node["node_config"]["InstanceType"] for node in gpu_types} == {"p4d.24xlarge", "p5.48xlarge"}
    assert sum(node["max_workers"] for node in gpu_types) == prepared["max_workers"]

    # Private: one pre-made security group on every node (so the launcher opens nothing itself),
    # internal IPs, and the dashboard bound to localhost (reached by `ray dashboard` tunnels).
    assert prepared["provider"]["use_internal_ips"] is True and "security_group" not in prepared["provider"]
    assert all(node["node_config"].get("SecurityGroupIds") for node in nodes.values())
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in yaml.safe_dump(prepared)

    # Token authentication for every Ray command, the token on every node, and the shared storage
    # and tracking settings in every node's environment.
    for command in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        assert command.startswith("RAY_AUTH_MODE=token ray stop") or "RAY_AUTH_MODE=token ray start" in command
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    setup = " ".join(prepared["setup_commands"])
    for variable in ("RAY_AUTH_MODE=token", "VITFLOW_STORAGE=s3://", "MLFLOW_TRACKING_URI="):
        assert variable in setup
    assert "pip install" in setup and "vitflow @ git+https://" in setup


def test_the_launcher_validation_catches_mistakes():
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    misspelt = {**config, "max_worker": 8}
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        launcher_config(misspelt)
    too_many = copy.deepcopy(config)
    too_many["available_node_types"]["worker.a100x8"]["min_workers"] = 9
    with pytest.raises(ValueError, match="max_workers"):
        launcher_config(too_many)


NODE = NodeResources(num_cpus=1, memory=3 * 1024**3, object_store_memory=300 * 1024**2)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, object_store):
    """Two raylets with 1 CPU each: two 1-CPU training workers can only run one per node. Each node has its
    own working and temp folders; what they share is the object store (its keys in their environment, as a
    cloud node has its instance role) and the tracking server."""
    root = tmp_path_factory.mktemp("cluster")
    with LocalCluster(root, nodes=(NODE, NODE), extra_env=object_store.env) as cluster:
        yield cluster
    assert processes_mentioning(str(cluster.temp_dir)) == []  # nothing of the cluster outlives the test


@pytest.fixture
def tracking_server(tmp_path):
    from workflows.compute.ui import server_command, server_env

    port = free_port()
    command = server_command(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}", tmp_path / "server" / "artifacts", port=port)
    (tmp_path / "server").mkdir()
    with MlflowServer(command, port, tmp_path / "mlflow-server.log", env=server_env()) as server:
        yield server


@pytest.mark.slow
def test_pretraining_on_two_nodes_survives_losing_a_node(tmp_path, cifar_shards, two_node_cluster, tracking_server,
                                                          object_store, bucket):
    """`vitflow submit --command pretrain`: two DDP workers, one per node, checkpointing into the bucket.
    The worker node's raylet is SIGKILLed after the first checkpoint (its machine lost) and a replacement
    node joins, as an autoscaler starts one: Ray Train restarts the worker group (``max_failures``) from
    the checkpoint in the store and the job succeeds with every step logged, at most one checkpoint
    interval redone."""
    from mlflow.tracking import MlflowClient

    steps, every = 120, 30
    config = {
        "name": "two-nodes",
        "dataset": str(cifar_shards),
        "model": {"variant": "Ti/8", "image_size": 32, "embed_dim": 48, "depth": 2, "num_heads": 3},
        "data": {"batch_size": 32, "num_workers": 1, "shuffle_buffer": 64},
        "train": {"total_steps": steps, "log_every": 5, "checkpoint_every": every, "eval_every": every,
                  "optim": {"lr": 2e-3, "warmup_steps": 2}},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        "storage_path": f"{bucket}/runs",  # the nodes share no folder: checkpoints go to the store
        "max_failures": 1,
        "tracking": {"uri": tracking_server.url, "experiment": "cluster-test"},
    }
    spec = tmp_path / "pretrain.yaml"
    spec.write_text(yaml.safe_dump(config))
    address = two_node_cluster.dashboard_url
    submitted = vitflow("submit", str(spec), "--command", "pretrain", "--address", address, env=two_node_cluster.env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_")

    fs = object_store.filesystem()
    stored = lambda: fs.get_file_info(pafs.FileSelector(f"{bucket.removeprefix('s3://')}/runs/two-nodes", recursive=True, allow_not_found=True))  # noqa: E731
    deadline = time.monotonic() + 900
    while not any(info.base_name == CHECKPOINT_FILE for info in stored()):
        assert time.monotonic() < deadline, "no checkpoint in the bucket within 900 s"
        time.sleep(0.2)
    killed_pid = two_node_cluster.kill_raylet(1)
    killed_at = time.time()
    replacement = two_node_cluster.add_node(NODE)
    logs = vitflow("logs", job_id, "--follow", "--address", address, env=two_node_cluster.env, timeout=900)
    assert logs.returncode == 0, f"{logs.stdout[-6000:]}\n{logs.stderr[-3000:]}"  # --follow exits with the outcome
    assert "registered: models:/vit-pretrained/1" in logs.stdout  # the job's own output
    status = vitflow("status", job_id, "--address", address, env=two_node_cluster.env)
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout

    # Ray's own records: the first worker group ran on both nodes, the second on the survivor and the replacement.
    ray_job_id = two_node_cluster.get(f"/api/jobs/{job_id}").json()["job_id"]
    workers = two_node_cluster.state("actors", class_name="RayTrainWorker", job_id=ray_job_id)
    nodes = {node["node_id"]: node for node in two_node_cluster.state("nodes")}
    dead = {node_id for node_id, node in nodes.items() if node["state"] == "DEAD"}
    assert len(workers) == 4 and len(dead) == 1, (workers, nodes)
    assert len({w["node_id"] for w in workers}) == 3 and dead <= {w["node_id"] for w in workers}

    client = MlflowClient(tracking_server.url, registry_uri=tracking_server.url)
    (version,) = client.search_model_versions("name = 'vit-pretrained'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vitflow.run_name"] == "two-nodes"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step for m in losses} == set(range(5, steps + 1, 5))  # nothing missing
    before = [m.step for m in losses if m.timestamp / 1000 <= killed_at]
    after = [m for m in losses if m.timestamp / 1000 > killed_at]
    resumed_from = min(m.step for m in after) - 5
    assert max(before) < steps, "the job had finished before the node was lost"
    assert resumed_from >= every and resumed_from % every == 0  # from a checkpoint in the store, not from step 0
    redone = max(before) - resumed_from
    assert 0 <= redone <= every  # at most one checkpoint interval
    recovery_s = min(m.timestamp for m in after) / 1000 - killed_at
    print(f"\nRELIABILITY worker node lost (raylet pid {killed_pid} SIGKILLed) at step ~{max(before)} of {steps}: "
          f"a replacement node (node {replacement}) joined; the worker group restarted from the step-{resumed_from} "
          f"checkpoint in the bucket; steps redone {redone} (interval {every}); first new metric {recovery_s:.0f} s "
          f"after the loss; job SUCCEEDED")


def test_leftovers_are_found_by_their_command_line(tmp_path):
    marker = str(tmp_path / "marker")
    assert processes_mentioning(marker) == []
    # Popen returns once the child's exec has begun, which is before the kernel sets its new command line:
    # wait for the child to say it runs (its command line is set by then), or the check races the exec.
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)", marker],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"
        assert processes_mentioning(marker) == [child.pid]
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_a_failed_job_or_a_wrong_token_ends_submit_with_an_error(tmp_path, two_node_cluster):
    spec = tmp_path / "pretrain.yaml"
    spec.write_text(yaml.safe_dump({"name": "no-data", "dataset": str(tmp_path / "missing"), "train": {"total_steps": 1}}))
    result = vitflow("submit", str(spec), "--command", "pretrain", "--address", two_node_cluster.dashboard_url,
                     "--wait", env=two_node_cluster.env, timeout=300)
    assert result.returncode == 1 and "FAILED" in result.stderr, result.stderr[-3000:]
    assert "missing" in result.stdout  # the job's own error message, followed live

    wrong_token = {**two_node_cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    result = vitflow("status", result.stdout.splitlines()[0], "--address", two_node_cluster.dashboard_url, env=wrong_token)
    assert result.returncode == 1 and "refused the request" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_cluster_recipe_at_toy_scale_on_two_nodes_sharing_no_disk_survives_a_killed_driver(
        tmp_path, cifar_source, flowers_source, two_node_cluster, team_tracking_server, object_store):
    """The cluster recipe's storage layout at toy scale (workflows/imagenet21k-vit-b16-toy.yaml, extended by a
    spec of the user's own that names the tracking server, as the README shows), submitted with `vitflow
    submit SPEC`: every location in the bucket `vitflow-toy`, two nodes that share no folder, tracking by a
    server on PostgreSQL with its artifacts in the store. The job's driver is SIGKILLed mid pre-training;
    the same spec submitted again finishes from the state found in the store and in MLflow alone:
    pre-training resumes from its checkpoint, one version of each model is registered. Pre-training's two
    DDP workers ran one per node; nothing of the dataset or the checkpoints is on a local disk outside
    Ray's temp folders."""
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    bucket = object_store.create_bucket("vitflow-toy")  # the README's steps: the bucket, the two corpora
    store = object_store.filesystem()
    for source, name in ((cifar_source, "cifar10"), (flowers_source, "flowers17")):
        pafs.copy_files(str(source), f"vitflow-toy/corpora/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=store)
    spec = tmp_path / "toy.yaml"
    spec.write_text(yaml.safe_dump({"extends": str(REPO_ROOT / "workflows" / "imagenet21k-vit-b16-toy.yaml"),
                                    "tracking": {"uri": team_tracking_server.url},
                                    "workdir": str(tmp_path / "work")}))  # the recipe's /tmp/vitflow: this test's own
    address = two_node_cluster.dashboard_url

    first = vitflow("submit", str(spec), "--address", address, env=two_node_cluster.env)
    assert first.returncode == 0, first.stderr[-3000:]
    first_job = first.stdout.splitlines()[0]
    checkpoints = lambda: [i.path for i in store.get_file_info(pafs.FileSelector("vitflow-toy/runs", recursive=True, allow_not_found=True))  # noqa: E731
                           if "-pretrain-" in i.path and i.base_name == CHECKPOINT_FILE]

    def job_status(job: str) -> str:  # polled through the dashboard's API: a `vitflow status` a second would
        return two_node_cluster.get(f"/api/jobs/{job}").json()["status"]  # take a core from the 2 nodes

    deadline = time.monotonic() + 900
    while not checkpoints():
        assert time.monotonic() < deadline, "no pre-training checkpoint in the bucket within 900 s"
        assert job_status(first_job) != "FAILED", vitflow("logs", first_job, "--address", address, env=two_node_cluster.env).stdout[-3000:]
        time.sleep(1)
    drivers = processes_mentioning(f"{SPEC_FOLDER}/{spec.name}")  # the entrypoint's shell and `vitflow run`
    assert drivers, "the job's driver process was not found"
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    deadline = time.monotonic() + 120
    while job_status(first_job) != "FAILED":
        assert time.monotonic() < deadline, "the killed driver's job did not end"  # the kill hit the driver itself
        time.sleep(1)
    assert "FAILED" in vitflow("status", first_job, "--address", address, env=two_node_cluster.env).stdout

    result = vitflow("submit", str(spec), "--address", address, "--wait", timeout=1500, env=two_node_cluster.env)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert "preprocess:imagenet21k: reused" in result.stdout and "preprocess:downstream: reused" in result.stdout
    jobs = [two_node_cluster.get(f"/api/jobs/{job}").json() for job in (first_job, result.stdout.splitlines()[0])]
    # The store's keys are in the nodes' environment only: never in a job's entrypoint, metadata or runtime_env.
    assert not [key for key in (object_store.access_key, object_store.secret_key) if key in json.dumps(jobs)]
    nodes = {node["node_id"] for node in two_node_cluster.alive_nodes()}
    workers = [worker for job in jobs
               for worker in two_node_cluster.state("actors", class_name="RayTrainWorker", job_id=job["job_id"])]
    # pre-training's two DDP workers, one per node (fine-tuning trials add 1-worker groups after them)
    assert len(nodes) == 2 and {worker["node_id"] for worker in workers} == nodes

    client = MlflowClient(team_tracking_server.url, registry_uri=team_tracking_server.url)
    experiment = client.get_experiment_by_name("vit-b16-toy").experiment_id

    def versions(name: str) -> list:
        return [v for v in client.search_model_versions(f"name = '{name}'")
                if client.get_run(v.run_id).info.experiment_id == experiment]  # the server is shared

    assert len(versions("vit-pretrained")) == 1
    (finetuned,) = versions("vit-finetuned")
    assert client.get_model_version_by_alias("vit-finetuned", "champion").version == finetuned.version
    pretrain_runs = client.search_runs([experiment], "tags.`vitflow.stage` = 'pretrain'")
    assert len(pretrain_runs) == 1, [(r.info.run_name, r.info.status, r.info.start_time, r.data.tags) for r in pretrain_runs]
    pretrain_run = pretrain_runs[0]
    losses = client.get_metric_history(pretrain_run.info.run_id, "train/loss")
    assert {m.step for m in losses} == set(range(5, 61, 5))  # the same run, resumed, no gap
    resumed_from = min(m.step for m in losses if m.timestamp / 1000 > killed_at) - 5
    assert resumed_from >= 20 and resumed_from % 20 == 0  # from a checkpoint in the store, not from step 0

    stored = object_store.objects(bucket)
    assert {"shards/imagenet21k/dataset.json", "shards/downstream/dataset.json"} <= set(stored)
    assert any("-finetune-" in key and "/experiment_state" in key for key in stored)  # Tune's state
    assert any(key.endswith("/MLmodel") for key in object_store.objects(team_tracking_server.artifacts))
    assert client.get_experiment(experiment).artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    with sqlalchemy.create_engine(team_tracking_server.database).connect() as connection:  # the runs are in PostgreSQL
        stored = connection.execute(sqlalchemy.text("SELECT count(*) FROM runs WHERE experiment_id = :e"),
                                    {"e": int(experiment)}).scalar()
    assert stored == len(client.search_runs([experiment])) >= 6
    local = [p for root in (tmp_path, two_node_cluster.root) for p in root.rglob("*") if p.is_file()]
    landed = [p for p in local if p.suffix == ".tar" or p.name == "dataset.json" or "checkpoint_" in str(p)
              or p.suffix in (".pt", ".safetensors")]
    assert landed == [], landed
    print(f"\nRELIABILITY the recipe at toy scale on 2 nodes, no shared disk: driver SIGKILLed after a checkpoint reached the bucket; the "
          f"resubmitted job reused both shard sets and resumed pre-training from step {resumed_from}")
