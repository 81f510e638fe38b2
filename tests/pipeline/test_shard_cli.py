"""`vitflow shard`: in-process (``tests.cli``) where it shards without Ray; a real subprocess of the installed
console script where it starts or joins a Ray cluster."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import ShardConfig, write_shards
from tests.cli import run_vitflow
from tests.objectstore import free_port
from tests.pipeline.test_shards import all_files
from tests.test_cli import vitflow


def test_help_explains_both_forms():
    result = run_vitflow("shard", "--help")
    assert result.returncode == 0 and "write" in result.stdout and "verify" in result.stdout
    assert "vitflow shard SOURCE OUT" in result.stdout
    result = run_vitflow("shard", "verify", "--help")
    assert result.returncode == 0 and "sha256" in result.stdout
    result = run_vitflow("shard", "write", "--help")
    assert result.returncode == 0 and "--max-size" in result.stdout and "--val-fraction" in result.stdout


def test_shard_then_verify_then_detect_damage(cifar_subset, tmp_path):
    out = tmp_path / "out"
    result = run_vitflow(
        "shard", str(cifar_subset), str(out), "--workers", "0", "--no-progress", "--shard-samples", "40", "--seed", "1"
    )
    assert result.returncode == 0, result.stderr
    assert "inputs 320 = sharded 320 + quarantined 0" in result.stdout
    assert out.joinpath("dataset.json").is_file() and len(list(out.glob("train/*.tar"))) == 8

    result = run_vitflow("shard", "verify", str(out))
    assert result.returncode == 0 and "ok: 16 shards, 320 samples" in result.stdout

    victim = out / "train" / "train-000005.tar"
    victim.write_bytes(victim.read_bytes()[:-2048])
    (out / "test" / "test-000001.tar").unlink()
    result = run_vitflow("shard", "verify", str(out))
    assert result.returncode == 1
    assert (
        "damaged: train/train-000005.tar" in result.stderr and "damaged: test/test-000001.tar: missing" in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/corpus", "OUT"], "/no/such/corpus: not found"),
        (["SOURCE", "OUT", "--max-size", "0"], "--max-size: Input should be greater than 0"),
        (["SOURCE", "OUT", "--val-fraction", "2"], "--val-fraction: Input should be less than 1"),
        (["SOURCE", "OUT", "--shard-size", "lots"], "--shard-size 'lots': expected a size"),
        (["SOURCE", "OUT", "--keep-formats", "jpeg,heic"], "--keep-formats: Input should be"),
        (["SOURCE", "OUT", "--source-kind", "zip"], "--source-kind 'zip'"),
        (["verify", "/no/such/dataset"], "/no/such/dataset/dataset.json: not found"),
    ],
)
def test_user_mistakes_are_one_line_errors(args, message, cifar_subset, tmp_path):
    args = [str(cifar_subset) if a == "SOURCE" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = run_vitflow("shard", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def ray_env(monkeypatch):
    """Ray state of the subprocesses in a short temp dir (socket paths are length-limited), no token auth."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the same for every process of one cluster
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_cli_with_its_own_local_ray_matches_the_in_process_bytes(flowers_subset, tmp_path, ray_env):
    reference = write_shards(flowers_subset, tmp_path / "inline", ShardConfig(max_size=80), workers=0, progress=False)
    result = vitflow("shard", str(flowers_subset), str(tmp_path / "ray"), "--max-size", "80", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert all_files(tmp_path / "ray") == all_files(reference.info.root)


@pytest.mark.slow
def test_cli_on_a_running_cluster_given_by_address(cifar_subset, tmp_path, ray_env):
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    # --block keeps the head in the foreground: terminating this one process stops the cluster it started.
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", f"--temp-dir={ray_env}"]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine is slow to start Ray
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not start"
            time.sleep(0.5)
        address = f"127.0.0.1:{port}"
        result = vitflow("shard", str(cifar_subset), str(tmp_path / "out"), "--address", address, "--workers", "2")
        assert result.returncode == 0, result.stderr
        assert "inputs 320 = sharded 320" in result.stdout
        assert vitflow("shard", "verify", str(tmp_path / "out")).returncode == 0
    finally:
        head.terminate()
        head.wait(timeout=60)
