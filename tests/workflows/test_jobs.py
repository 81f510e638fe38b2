"""`vitflow submit/status/logs/ui` without a cluster: what a job ships, and failures that must be quick and clear."""

from __future__ import annotations

import time

from tests.cli import run_vitflow
from tests.workflows.servers import free_port
from workflows.compute.jobs import SPEC_FOLDER, ship


def test_a_job_ships_the_project_and_the_spec_but_no_environments_runs_or_data(tmp_path):
    project = tmp_path / "project"
    for path in ("pyproject.toml", "vit/data.py", "workflows/cli.py", "tests/data/sample.txt", "benchmarks/run.py",
                 ".venv/bin/python", ".git/HEAD", "vit/__pycache__/data.cpython-311.pyc", "vitflow.egg-info/PKG-INFO",
                 "data/cifar.tar", "mlruns/0/meta.yaml", "mlflow.db", "vitflow-runs/ckpt", "benchmarks/.work/x"):
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text("x")
    spec = tmp_path / "elsewhere" / "my spec.yaml"
    spec.parent.mkdir()
    spec.write_text("name: demo\n")

    staged = tmp_path / "staged"
    relative = ship(spec, staged, project)

    assert relative == f"{SPEC_FOLDER}/my spec.yaml" and (staged / relative).read_text() == "name: demo\n"
    shipped = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert shipped == {"pyproject.toml", "vit/data.py", "workflows/cli.py", "tests/data/sample.txt",
                       "benchmarks/run.py", relative}  # anchored excludes (/data) spare tests/data


def test_without_a_project_only_the_spec_is_shipped(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: demo\n")
    ship(spec, tmp_path / "staged", project_root=None)
    assert [p.name for p in (tmp_path / "staged").rglob("*") if p.is_file()] == ["spec.yaml"]


def test_an_unreachable_cluster_fails_fast_with_a_clear_message(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: demo\n")
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (("submit", str(spec), "--address", address), ("status", "raysubmit_x", "--address", address),
                 ("logs", "raysubmit_x", "--address", address, "--follow")):
        start = time.monotonic()
        result = run_vitflow(*args)
        assert result.returncode == 1, result.stderr
        assert f"cannot reach the Ray dashboard at {address}" in result.stderr and "Traceback" not in result.stderr
        assert time.monotonic() - start < 30  # one refused connection: no retrying for minutes


def test_submit_and_ui_reject_user_mistakes(tmp_path):
    result = run_vitflow("submit", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "no such file" in result.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: demo\n")
    result = run_vitflow("submit", str(spec), "--command", "train")
    assert result.returncode == 2 and "expected one of run, pretrain" in result.stderr
    result = run_vitflow("submit", str(spec), "--command", "pretrain")  # checked locally before anything is sent
    assert result.returncode == 2 and "invalid configuration" in result.stderr and "dataset" in result.stderr
    result = run_vitflow("ui", "--tracking-uri", f"sqlite:///{tmp_path}/none/mlflow.db")
    assert result.returncode == 2 and "no MLflow store here" in result.stderr
    result = run_vitflow("ui", "--tracking-uri", "http://127.0.0.1:5000")
    assert result.returncode == 2 and "expected an embedded store" in result.stderr
