"""Multi-user deployments (docs/SECURITY.md): a real MLflow server in basic-auth mode and a real Ray
cluster in token mode refuse anonymous requests; vitflow, given credentials through the environment, works.

(tests/workflows/test_cluster.py already covers a wrong Ray token on `vitflow status`; here: no token.)
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.cli import run_vitflow as in_process
from tests.workflows.servers import (
    LocalCluster,
    MlflowServer,
    NodeResources,
    free_port,
    processes_mentioning,
)

pytestmark = pytest.mark.slow

VITFLOW = str(Path(sys.executable).parent / "vitflow")
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def run_vitflow(*args: str, env: dict, timeout: float = 120):
    """The console script in a fresh process: Ray's client reads its token from the environment and HOME once
    a process (the in-process runner, ``tests.cli``, would keep what an earlier call read)."""
    import subprocess

    return subprocess.run([VITFLOW, *args], capture_output=True, text=True, timeout=timeout, env=env)


# --- MLflow: `mlflow server --app-name basic-auth` ---------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A tracking server with MLflow's basic-auth app: users in their own SQLite database, an admin whose
    password comes from the auth config, everyone else READ by default (MLflow's default)."""
    from workflows.compute.ui import server_command, server_env

    root = tmp_path_factory.mktemp("mlflow-auth")
    admin = ("admin", secrets.token_urlsafe(16))
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {admin[0]}\n"
        f"admin_password = {admin[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    command = server_command(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", port=port) + ["--app-name", "basic-auth"]
    env = {**server_env(), "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    for name in (*CREDENTIAL_VARIABLES, "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    start = time.monotonic()
    with MlflowServer(command, port, root / "server.log", env=env) as server:
        print(f"basic-auth MLflow server up in {time.monotonic() - start:.1f} s")
        yield server, admin


@pytest.fixture
def no_credentials(monkeypatch):
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def create_user(server, admin, username: str) -> tuple[str, str]:
    password = secrets.token_urlsafe(16)
    response = requests.post(f"{server.url}/api/2.0/mlflow/users/create", json={"username": username, "password": password},
                             auth=admin, timeout=30)
    assert response.status_code == 200, response.text
    return username, password


def test_anonymous_and_wrong_credentials_are_refused(auth_server, no_credentials):
    import mlflow

    from workflows import tracking
    from workflows.stages.preflight import PreflightError, check_tracking

    server, admin = auth_server
    api = f"{server.url}/api/2.0/mlflow"
    requests_to_make = [
        ("GET", f"{api}/experiments/search", {"params": {"max_results": 1}}),
        ("POST", f"{api}/experiments/create", {"json": {"name": "anonymous"}}),
        ("POST", f"{api}/runs/create", {"json": {"experiment_id": "0"}}),
        ("GET", f"{api}/registered-models/search", {}),
        ("GET", f"{server.url}/", {}),  # the UI
    ]
    for method, url, extra in requests_to_make:
        anonymous = requests.request(method, url, timeout=30, **extra)
        assert anonymous.status_code == 401, (url, anonymous.status_code, anonymous.text[:200])
        assert anonymous.headers.get("WWW-Authenticate", "").startswith("Basic")
        wrong = requests.request(method, url, timeout=30, auth=(admin[0], "not-the-password"), **extra)
        assert wrong.status_code == 401, (url, wrong.status_code)
    assert requests.get(f"{server.url}/health", timeout=30).ok  # unprotected: what liveness probes use
    assert requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=admin, timeout=30).ok

    # vitflow's preflight tells a refused login from an unreachable server, before any work.
    with pytest.raises(PreflightError, match=r"tracking.uri http://127.0.0.1:\d+: the server refused the credentials \(HTTP 401\).*none is set"):
        check_tracking(server.url, key="tracking.uri")
    # And the adapter itself fails at once (MLflow does not retry a 401), without creating anything.
    start = time.monotonic()
    with pytest.raises(mlflow.exceptions.MlflowException, match="401|UNAUTHENTICATED|Unauthorized|credentials"):
        tracking.ensure_experiment("anonymous", server.url)
    assert time.monotonic() - start < 30
    assert requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "anonymous"}, auth=admin,
                        timeout=30).status_code == 404


def test_an_authenticated_client_logs_a_run_and_registers_a_model(auth_server, no_credentials, monkeypatch):
    import mlflow
    import torch

    from vit import VisionTransformer, ViTConfig
    from workflows import tracking
    from workflows.stages.preflight import check_tracking

    server, admin = auth_server
    alice = create_user(server, admin, "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", alice[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", alice[1])
    check_tracking(server.url, key="tracking.uri")

    start = time.monotonic()
    run_id = tracking.start_run(server.url, "team-vit", "alice-pretrain", tags={"vitflow.stage": "pretrain"})
    tracking.log_params(server.url, run_id, {"model": {"embed_dim": 16, "depth": 1}})
    tracking.log_metrics(server.url, run_id, {"train/loss": 1.5}, step=1)
    model = VisionTransformer(ViTConfig(image_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3))
    logged = tracking.log_vit_model(server.url, run_id, model, ["a", "b", "c"])  # artifacts through the server
    version = tracking.register_model(server.url, logged.model_uri, "vit-team", {"owner": "alice"}, run_id)
    tracking.end_run(server.url, run_id)
    assert version == "1"
    plain = tracking.load_plain_model(server.url, "models:/vit-team/1")  # downloaded through the server
    assert plain.class_names == ["a", "b", "c"]
    assert all(torch.equal(plain.state_dict[k], v) for k, v in model.state_dict().items())
    elapsed = time.monotonic() - start

    # What the server recorded, seen by the admin: alice's finished run and her registered version.
    api = f"{server.url}/api/2.0/mlflow"
    run = requests.get(f"{api}/runs/get", params={"run_id": run_id}, auth=admin, timeout=30).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    versions = requests.get(f"{api}/model-versions/search", params={"filter": "name='vit-team'"}, auth=admin,
                            timeout=30).json()["model_versions"]
    assert [(v["version"], v["run_id"]) for v in versions] == [("1", run_id)]

    # Another user reads it (default READ) but cannot change it: permissions are per user.
    bob = create_user(server, admin, "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", bob[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", bob[1])
    assert tracking.load_plain_model(server.url, "models:/vit-team/1").class_names == ["a", "b", "c"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="403|PERMISSION_DENIED|Permission denied"):
        tracking.set_tags(server.url, run_id, {"tampered": "yes"})
    print(f"authenticated run + model log + registration + download: {elapsed:.1f} s")


def test_vitflow_validate_reports_refused_credentials_in_one_line(tmp_path, auth_server, no_credentials):
    server, admin = auth_server
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "auth", "workdir": str(tmp_path / "work"),
                                    "tracking": {"uri": server.url, "experiment": "auth"},
                                    "preprocess": {"corpus": {"source": str(corpus)}}}))
    result = in_process("validate", str(spec), env=dict.fromkeys(CREDENTIAL_VARIABLES))  # none of them set
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {spec}: tracking.uri {server.url}: the server refused the credentials (HTTP 401)" in result.stderr
    result = in_process("validate", str(spec), env={"MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": admin[1]})
    assert result.returncode == 0, result.stderr


# --- Ray: token authentication (RAY_AUTH_MODE=token), as cluster.yaml sets it ------------------------

@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """One real Ray head in token mode with its own token (tests.workflows.servers.LocalCluster)."""
    root = tmp_path_factory.mktemp("token-cluster")
    with LocalCluster(root, nodes=(NodeResources(num_cpus=1),)) as cluster:
        yield cluster
    assert processes_mentioning(str(cluster.temp_dir)) == []


def without_ray_token(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment with no Ray token anywhere: no variables, and a HOME without ~/.ray/auth_token."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **extra}


def test_ray_refuses_requests_without_the_token(tmp_path, token_cluster):
    url = token_cluster.dashboard_url
    for path in ("/api/jobs/", "/api/v0/nodes", "/api/v0/actors"):
        anonymous = requests.get(f"{url}{path}", timeout=10)
        assert anonymous.status_code == 401, (path, anonymous.status_code, anonymous.text[:200])
        assert token_cluster.get(path).status_code == 200  # the same request with the cluster's token
    # Submitting a job without the token: refused, and no job exists afterwards.
    anonymous = requests.post(f"{url}/api/jobs/", json={"entrypoint": "touch /tmp/vitflow-anonymous-job"}, timeout=10)
    assert anonymous.status_code == 401, anonymous.text[:200]
    assert token_cluster.get("/api/jobs/").json() == []

    spec = tmp_path / "pretrain.yaml"
    spec.write_text(yaml.safe_dump({"name": "no-token", "dataset": str(tmp_path), "train": {"total_steps": 1}}))
    for env in (without_ray_token(tmp_path), without_ray_token(tmp_path, RAY_AUTH_MODE="token")):
        start = time.monotonic()
        result = run_vitflow("submit", str(spec), "--command", "pretrain", "--address", url, env=env)
        elapsed = time.monotonic() - start
        assert result.returncode == 1, (env.get("RAY_AUTH_MODE"), result.stdout, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and url in result.stderr, result.stderr[-2000:]
        assert "refused" in result.stderr or "token" in result.stderr.lower(), result.stderr[-2000:]
        assert elapsed < 60
        print(f"vitflow submit without a token (RAY_AUTH_MODE={env.get('RAY_AUTH_MODE')}): exit 1 in {elapsed:.1f} s: "
              f"{result.stderr.strip().splitlines()[-1][:300]}")
        result = run_vitflow("status", "raysubmit_0000000000000000", "--address", url, env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert token_cluster.get("/api/jobs/").json() == []  # nothing was submitted
