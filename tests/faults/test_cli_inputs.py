"""`vitflow` given wrong paths and unreachable servers: one clear line naming the input, a non-zero exit,
no traceback, and no hang (each command is held to finishing well within a bound). The commands run in the
test's process (``tests.cli``: the CLI application itself, without ~7 s of imports a command).

The servers are real sockets: a port nothing listens on (refused at once) and a server that accepts the
connection but never answers (only a time-out ends that: MLflow's HTTP client alone would retry it for
minutes, Ray's Jobs client has no time-out at all)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import yaml

from tests.cli import run_vitflow
from tests.workflows.servers import free_port

pytestmark = pytest.mark.slow

FAST_S = 30  # the bound we hold a command to: a few seconds of probing (MLflow's client alone retries for minutes)


@pytest.fixture(scope="module")
def closed_port() -> int:
    return free_port()  # bound once, released: nothing listens there


@pytest.fixture(scope="module")
def silent_server():
    """Accepts TCP connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield server.getsockname()[1]
    server.close()


def fails_clearly(args: list[str], *names: str, code: int | None = None, cwd: Path | None = None) -> str:
    """Run `vitflow ARGS`; it must fail within FAST_S with exit ``code`` (or any non-zero), print exactly one
    `error:` line naming every one of ``names``, and no traceback. Returns that line."""
    start = time.monotonic()
    result = run_vitflow(*args, cwd=cwd)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0 and (code is None or result.returncode == code), (args, result.returncode, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, (args, result.stderr[-3000:])
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert elapsed < FAST_S, f"{args}: {elapsed:.0f} s"
    print(f"vitflow {' '.join(args[:2])}...: exit {result.returncode} in {elapsed:.1f} s: {errors[0][:160]}")
    return errors[0]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def pretrain_config(tmp_path: Path, dataset: str, tracking_uri: str | None = None) -> dict:
    return {"name": "inputs", "dataset": dataset, "storage_path": str(tmp_path / "runs"),
            "model": {"variant": "Ti/8", "image_size": 32, "embed_dim": 48, "depth": 1, "num_heads": 3},
            "data": {"batch_size": 16, "num_workers": 0}, "train": {"total_steps": 2},
            "tracking": {"uri": tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "inputs"}}


def finetune_config(tmp_path: Path, dataset: str, tracking_uri: str | None = None) -> dict:
    return {"name": "inputs-ft", "dataset": dataset, "pretrained": "models:/vit-pretrained/1",
            "storage_path": str(tmp_path / "runs"),
            "train": {"total_steps": 2, "eval_every": 2, "checkpoint_every": 2},
            "search": {"image_size": [32], "lr": {"min": 0.001, "max": 0.01}, "num_samples": 1},
            "tracking": {"uri": tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "inputs"}}


def workflow_spec(tmp_path: Path, source: str, **overrides) -> dict:
    return {"name": "inputs", "workdir": str(tmp_path / "work"), "tracking": {"experiment": "inputs"},
            "preprocess": {"corpus": {"source": source}}, **overrides}


# --- wrong paths -------------------------------------------------------------------------------------

def test_missing_files_and_folders_are_named(tmp_path, cifar_shards):
    missing = tmp_path / "no-such"
    for command in ("validate", "run", "pretrain", "submit"):
        fails_clearly([command, str(missing / "spec.yaml")], f"{missing / 'spec.yaml'}: no such file", code=2)
    # A configuration that reads, pointing at data that does not.
    config = write(tmp_path / "pretrain.yaml", pretrain_config(tmp_path, str(missing / "shards")))
    fails_clearly(["pretrain", str(config)], str(config), "dataset:", str(missing / "shards"), code=2)
    config = write(tmp_path / "finetune.yaml", finetune_config(tmp_path, str(missing / "shards")))
    fails_clearly(["finetune", str(config)], str(config), "dataset:", str(missing / "shards"), code=2)
    fails_clearly(["evaluate", "models:/vit-finetuned@champion", str(missing / "shards")], "DATASET",
                  str(missing / "shards"), code=2)
    # A shard folder that exists but is no dataset; a missing one.
    fails_clearly(["shard", "verify", str(tmp_path)], str(tmp_path / "dataset.json"), code=2)
    fails_clearly(["shard", "verify", str(missing)], str(missing), code=2)
    fails_clearly(["shard", str(missing / "corpus"), str(tmp_path / "out"), "--workers", "0"], str(missing / "corpus"),
                  code=2)
    # A workflow whose corpus is missing fails before Ray starts or a run is opened.
    spec = write(tmp_path / "workflow.yaml", workflow_spec(tmp_path, str(missing / "corpus")))
    fails_clearly(["run", str(spec)], str(spec), "preprocess.corpus.source", str(missing / "corpus"), code=1)
    fails_clearly(["validate", str(spec)], "preprocess.corpus.source", code=2)
    assert not (tmp_path / "work" / "mlflow.db").exists()
    # An evaluation in a folder with no tracking store: named, and no empty store left behind.
    fails_clearly(["evaluate", "models:/vit-finetuned/99", str(cifar_shards)], "models:/vit-finetuned/99",
                  f"no tracking store at {tmp_path / 'mlflow.db'}", code=2, cwd=tmp_path)
    assert not (tmp_path / "mlflow.db").exists()
    fails_clearly(["evaluate", str(missing / "model"), str(cifar_shards), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                  str(missing / "model"), "no such folder", code=2)
    # An evaluation of a model an existing store does not have.
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'empty.db'}").search_experiments()  # creates the store
    fails_clearly(["evaluate", "models:/vit-finetuned/99", str(cifar_shards), "--tracking-uri",
                   f"sqlite:///{tmp_path / 'empty.db'}"], "models:/vit-finetuned/99", "not found", code=2)


# --- unreachable Ray -----------------------------------------------------------------------------------

def test_an_unreachable_ray_cluster_fails_fast(tmp_path, closed_port, silent_server, cifar_source):
    spec = write(tmp_path / "workflow.yaml", workflow_spec(tmp_path, str(cifar_source)))
    address = f"http://127.0.0.1:{closed_port}"
    fails_clearly(["submit", str(spec), "--address", address], f"cannot reach the Ray dashboard at {address}", code=1)
    fails_clearly(["status", "raysubmit_0000000000000000", "--address", address], address, code=1)
    fails_clearly(["logs", "raysubmit_0000000000000000", "--address", address], address, code=1)
    fails_clearly(["logs", "raysubmit_0000000000000000", "--follow", "--address", address], address, code=1)
    silent = f"http://127.0.0.1:{silent_server}"  # Ray's own client would wait forever here
    fails_clearly(["submit", str(spec), "--address", silent], f"cannot reach the Ray dashboard at {silent}", code=1)
    fails_clearly(["status", "raysubmit_0000000000000000", "--address", silent], silent, code=1)
    fails_clearly(["submit", str(spec), "--address", "ray://127.0.0.1:10001"], "dashboard's HTTP address", code=1)
    # A workflow that names a cluster nothing answers at: refused before Ray is started or a run opened.
    for command, address in (("run", f"127.0.0.1:{closed_port}"), ("validate", f"ray://127.0.0.1:{closed_port}")):
        remote = write(tmp_path / "remote.yaml", workflow_spec(tmp_path, str(cifar_source), ray={"address": address}))
        fails_clearly([command, str(remote)], "ray.address", address, code=1 if command == "run" else 2)
    assert not (tmp_path / "work" / "mlflow.db").exists()


# --- unreachable MLflow --------------------------------------------------------------------------------

def test_an_unreachable_tracking_server_fails_fast(tmp_path, closed_port, silent_server, cifar_source, cifar_shards):
    uri = f"http://127.0.0.1:{closed_port}"
    config = write(tmp_path / "pretrain.yaml", pretrain_config(tmp_path, str(cifar_shards), uri))
    fails_clearly(["pretrain", str(config)], str(config), f"tracking.uri {uri}", "does not answer", code=3)
    config = write(tmp_path / "finetune.yaml", finetune_config(tmp_path, str(cifar_shards), uri))
    fails_clearly(["finetune", str(config)], str(config), f"tracking.uri {uri}", "does not answer", code=3)
    fails_clearly(["evaluate", "models:/vit-finetuned@champion", str(cifar_shards), "--tracking-uri", uri],
                  f"--tracking-uri {uri}", "does not answer", code=3)
    spec = write(tmp_path / "workflow.yaml", workflow_spec(tmp_path, str(cifar_source), tracking={"uri": uri}))
    fails_clearly(["run", str(spec)], f"tracking.uri {uri}", "does not answer", code=3)
    fails_clearly(["validate", str(spec)], f"tracking.uri {uri}", "does not answer", code=3)
    # A server that accepts the connection and never answers: MLflow's client alone would retry for minutes.
    silent = f"http://127.0.0.1:{silent_server}"
    config = write(tmp_path / "pretrain.yaml", pretrain_config(tmp_path, str(cifar_shards), silent))
    fails_clearly(["pretrain", str(config)], str(config), f"tracking.uri {silent}", "does not answer", code=3)
    spec = write(tmp_path / "workflow.yaml", workflow_spec(tmp_path, str(cifar_source), tracking={"uri": silent}))
    fails_clearly(["run", str(spec)], f"tracking.uri {silent}", "does not answer", code=3)
    assert not (tmp_path / "runs").exists()  # no stage got as far as its storage
