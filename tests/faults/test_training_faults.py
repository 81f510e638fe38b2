"""Faults during pre-training, injected for real: a Ray Train worker process SIGKILLed; the MLflow
tracking server stopped for ~30 s and restarted; the server stopped for good (the model is kept locally
and `vitflow upload` sends it later). Each test prints its figures (work lost, time to recover), which
docs/RELIABILITY.md records."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.cli import run_vitflow
from tests.faults.conftest import checkpoint_steps, wait_for
from tests.workflows.servers import MlflowServer, free_port
from vit import VisionTransformer
from workflows import tracking
from workflows.stages.pretrain import PretrainConfig, run_pretrain

pytestmark = pytest.mark.slow

NORM = {"mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}


def settings(tmp_path: Path, shards: Path, name: str, uri: str, *, steps: int, checkpoint_every: int, **changes) -> PretrainConfig:
    fields = dict(
        name=name,
        dataset=str(shards),
        # Big enough that a step takes tens of milliseconds: the faults land mid-run.
        model={"variant": "Ti/4", "image_size": 32, "embed_dim": 96, "depth": 4, "num_heads": 3},
        data={"batch_size": 32, "num_workers": 1, "shuffle_buffer": 64, **NORM},
        train={"total_steps": steps, "log_every": 5, "checkpoint_every": checkpoint_every, "eval_every": checkpoint_every,
               "optim": {"lr": 1e-3, "warmup_steps": 5}},
        resources={"num_workers": 1, "cpus_per_worker": 2},
        storage_path=str(tmp_path / "runs"),
        tracking={"uri": uri, "experiment": "faults"},
    )
    fields.update(changes)
    return PretrainConfig.model_validate(fields)


def history(uri: str, run_id: str, key: str = "train/loss"):
    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))


def in_background(function, *args, **kwargs):
    """Run ``function`` in a thread; ``join()`` returns its result or raises its error."""
    box: dict = {}

    def target():
        try:
            box["result"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout_s: float = 900):
        thread.join(timeout_s)
        assert not thread.is_alive(), "the run did not finish in time"
        if "error" in box:
            raise box["error"]
        return box["result"]

    return join


def test_a_sigkilled_worker_is_replaced_and_loses_at_most_one_checkpoint_interval(tmp_path, cifar_shards, local_ray):
    from ray.util.state import list_actors

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = settings(tmp_path, cifar_shards, "worker-kill", uri, steps=60, checkpoint_every=20, max_failures=1,
                      register_as=None)
    join = in_background(run_pretrain, config)
    run_dir = tmp_path / "runs" / "worker-kill"
    wait_for(lambda: checkpoint_steps(run_dir), 600, "the first checkpoint", every_s=0.2)
    this_ray = local_ray.get_runtime_context().gcs_address  # not "any Ray on the machine": tests run side by side
    workers = wait_for(lambda: list_actors(address=this_ray,
                                           filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]),
                       60, "the training worker actor")
    time.sleep(1.0)  # a little past the checkpoint: some work to lose
    # Frozen first, then its newest complete checkpoint read, then killed: a checkpoint it was writing
    # cannot complete between the look and the kill (the replacement would resume from that one instead).
    os.kill(workers[0].pid, signal.SIGSTOP)
    killed_at = time.time()
    checkpointed = max(checkpoint_steps(run_dir))
    os.kill(workers[0].pid, signal.SIGKILL)
    result = join()

    assert result.metrics["step"] == 60  # exactly the configured step count
    losses = history(uri, result.run_id)
    logged_steps = {m.step for m in losses}
    assert logged_steps == set(range(5, 61, 5))  # no gap: lost steps were trained (and logged) again
    after = [m for m in losses if m.timestamp / 1000 > killed_at]
    resumed_at = min(m.step for m in after) - 5  # the first step logged after the kill, less one log interval
    assert resumed_at == checkpointed  # resumed from the last checkpoint before the kill, not from 0
    before = [m.step for m in losses if m.timestamp / 1000 <= killed_at]
    lost_steps = max(before) - checkpointed if before else 0
    assert 0 <= lost_steps <= 20  # at most one checkpoint interval
    recovery_s = min(m.timestamp for m in after) / 1000 - killed_at
    print(f"\nRELIABILITY worker SIGKILL: killed pid {workers[0].pid} after step ~{max(before, default=0)}; "
          f"resumed from the step-{checkpointed} checkpoint; steps redone >= {lost_steps} (of a 20-step interval); "
          f"first new metric {recovery_s:.1f} s after the kill; finished at step {result.metrics['step']}")


def mlflow_server(tmp_path: Path, port: int) -> MlflowServer:
    from workflows.compute.ui import server_command, server_env

    (tmp_path / "server").mkdir(exist_ok=True)
    command = server_command(f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}", tmp_path / "server" / "artifacts", port=port)
    return MlflowServer(command, port, tmp_path / f"mlflow-server-{time.monotonic_ns()}.log", env=server_env())


def test_a_30_second_tracking_outage_loses_no_metrics(tmp_path, cifar_shards, local_ray):
    port = free_port()
    server = mlflow_server(tmp_path, port).__enter__()
    try:
        uri = server.url
        config = settings(tmp_path, cifar_shards, "outage", uri, steps=200, checkpoint_every=50)
        join = in_background(run_pretrain, config)
        run_id = wait_for(lambda: tracking.find_run(uri, "faults", {"vitflow.run_name": "outage"}), 120, "the MLflow run")
        wait_for(lambda: history(uri, run_id), 600, "the first metrics in MLflow", every_s=1.0)
        run_dir = tmp_path / "runs" / "outage"
        seen = checkpoint_steps(run_dir)
        server.__exit__()
        down_at = time.time()
        time.sleep(30)
        # Down for 30 s, and until training has checkpointed (and so logged) at least once meanwhile,
        # however slow the machine is.
        wait_for(lambda: checkpoint_steps(run_dir) != seen, 900, "a checkpoint during the outage", every_s=0.5)
        server = mlflow_server(tmp_path, port).__enter__()
        up_at = time.time()
        result = join()
    finally:
        server.__exit__()
    with mlflow_server(tmp_path, port) as server:
        client = MlflowClient(server.url, registry_uri=server.url)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED" and result.offline is None and result.version
        losses = history(server.url, result.run_id)
        assert {m.step for m in losses} == set(range(5, 201, 5))  # every logged step arrived
        during = [m for m in losses if down_at < m.timestamp / 1000 < up_at]
        assert during, "training should have gone on (and logged) while the server was down"
        assert client.get_model_version("vit-pretrained", result.version).run_id == result.run_id
    print(f"\nRELIABILITY tracking outage: server down {up_at - down_at:.0f} s; {len(during)} train/loss points "
          f"logged meanwhile reached MLflow afterwards; run FINISHED, model registered as version {result.version}")


def test_a_tracking_server_that_never_returns_leaves_an_uploadable_bundle(tmp_path, cifar_shards, local_ray, capsys):
    port = free_port()
    server = mlflow_server(tmp_path, port).__enter__()
    try:
        uri = server.url
        config = settings(tmp_path, cifar_shards, "gone", uri, steps=150, checkpoint_every=50,
                          tracking={"uri": uri, "experiment": "faults", "offline_after_s": 5})
        join = in_background(run_pretrain, config)
        run_id = wait_for(lambda: tracking.find_run(uri, "faults", {"vitflow.run_name": "gone"}), 120, "the MLflow run")
        wait_for(lambda: history(uri, run_id), 600, "the first metrics in MLflow", every_s=1.0)
    finally:
        server.__exit__()
    stopped_at = time.time()
    result = join()  # training finishes without its tracking server
    finished_s = time.time() - stopped_at
    bundle = Path(result.offline)
    assert result.version is None and result.model_uri == str(bundle / "model")
    assert bundle == tmp_path / "runs" / "gone" / "mlflow-offline"
    assert f"vitflow upload {bundle}" in capsys.readouterr().out  # says how to upload
    assert checkpoint_steps(tmp_path / "runs" / "gone")[-1] == 150  # the checkpoints are kept
    kept = tracking.read_spilled_metrics(bundle / tracking.OFFLINE_METRICS)[run_id]
    assert {m.step for m in kept if m.key == "train/loss"} >= {150}
    plain = tracking.load_plain_model("unused", str(bundle / "model"))  # the model is usable as it is
    model = VisionTransformer(plain.config)
    model.load_state_dict(plain.state_dict)

    with mlflow_server(tmp_path, port) as server:  # the server is back (same store): upload
        uploaded = run_vitflow("upload", str(bundle))
        assert uploaded.returncode == 0, uploaded.stderr
        assert "registered: models:/vit-pretrained/1" in uploaded.stdout
        client = MlflowClient(server.url, registry_uri=server.url)
        assert client.get_run(run_id).info.status == "FINISHED"
        assert {m.step for m in history(server.url, run_id)} == set(range(5, 151, 5))
        served = tracking.load_plain_model(server.url, "models:/vit-pretrained/1")
        for key, value in plain.state_dict.items():
            torch.testing.assert_close(served.state_dict[key], value, rtol=0, atol=0)
        again = run_vitflow("upload", str(bundle))  # repeating it registers nothing new
        assert again.returncode == 0, again.stderr
        assert len(client.search_model_versions("name = 'vit-pretrained'")) == 1
    print(f"\nRELIABILITY tracking server gone: training finished {finished_s:.0f} s after the server stopped; "
          f"{len(kept)} metrics and the model kept in {bundle.name}; `vitflow upload` sent them and registered "
          f"version 1 once the server was back")
