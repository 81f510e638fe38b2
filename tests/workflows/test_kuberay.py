"""kuberay/: the KubeRay manifests beside cluster.yaml, checked without a Kubernetes cluster. They are real
ray.io/v1 objects; Ray's own autoscaler reads the RayCluster as a CPU head declaring the trial-driver
resource and an autoscaled GPU group sized for the recipe the RayJob runs; the RayJob runs a `vitflow`
command the real CLI parses, on a spec that validates; every secret comes from a Kubernetes Secret the
header says how to create; every pod template passes Kubernetes' own schema (kubernetes-validate, offline).

No KubeRay package ships the RayCluster/RayJob CRD schema: the pod templates inside are checked as
`v1 PodTemplate`s, the rest by Ray's autoscaler and the assertions here."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import (
    _derive_autoscaling_config_from_ray_cr,  # what Ray's autoscaler makes of a RayCluster
)

from tests.cli import run_vitflow
from tests.conftest import REPO_ROOT
from workflows.cli.main import app
from workflows.compute.local_ray import TRIAL_DRIVER_RESOURCE
from workflows.spec import WorkflowSpec, load_spec

KUBERAY = REPO_ROOT / "kuberay"
RAYCLUSTER = KUBERAY / "raycluster.yaml"
RAYJOB = KUBERAY / "rayjob.yaml"
MANIFESTS = {"raycluster": RAYCLUSTER, "rayjob": RAYJOB}
KUBERNETES_VERSION = "1.30.0"  # the schema checked against (kubernetes-validate bundles each release's, offline)

# Environment variables whose value is a secret, or identifies its holder: only ever from a Secret.
SECRET_VARIABLE = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|KEY_ID|CREDENTIAL|USERNAME", re.IGNORECASE)
# Values that look like keys, wherever they stand: AWS access key ids, 40-character secret access keys,
# long hex tokens (`secrets.token_hex`), and passwords inside URLs.
LOOKS_LIKE_A_KEY = (
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*\d)(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])"
               r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
    re.compile(r"\b[0-9a-f]{32,}\b"),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),
)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups = {"head": spec["headGroupSpec"]["template"]}
    groups.update({group["groupName"]: group["template"] for group in spec.get("workerGroupSpecs", [])})
    return groups


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [container for template in pod_templates(spec).values()
            for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]]


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def documented_secrets(header: str) -> dict[str, set[str]]:
    """The Secrets and keys the header's `kubectl create secret generic NAME --from-...=KEY=...` lines make."""
    secrets: dict[str, set[str]] = {}
    for line in header.splitlines():
        found = re.search(r"kubectl create secret generic (\S+)(.*)", line)
        if found:
            secrets[found[1]] = set(re.findall(r"--from-(?:literal|file)=(\w+)=", found[2]))
    return secrets


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def secret_problems(doc: dict[str, Any], secrets: dict[str, set[str]]) -> list[str]:
    """Every way a manifest could hold a secret itself, or name a Secret the header never creates."""
    spec = cluster_spec(doc)
    problems = []
    for container in containers(spec):
        for variable in container.get("env", []):
            where = f"{container['name']}: {variable['name']}"
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            if SECRET_VARIABLE.search(variable["name"]) and (ref is None or "value" in variable):
                problems.append(f"{where} is not read from a Secret")
            if ref is not None and ref["name"] not in secrets:
                problems.append(f"{where} reads Secret {ref['name']!r}, which the header does not create")
            elif ref is not None and not ref.get("optional") and ref["key"] not in secrets[ref["name"]]:
                problems.append(f"{where} reads key {ref['key']!r} of {ref['name']!r}, which the header does not set")
        for source in container.get("envFrom", []):
            problems.append(f"{container['name']}: envFrom {source} hides which variables it sets")
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token" or "auth_token" not in secrets.get(auth.get("secretName"), ()):
        problems.append(f"authOptions {auth}: not token mode from a created Secret with key auth_token")
    if doc["kind"] == "RayJob":
        runtime_env = yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")
        problems += [f"runtimeEnvYAML sets {name}: a job's runtime_env is readable by anyone with the token"
                     for name in runtime_env.get("env_vars", {}) if SECRET_VARIABLE.search(name)]
    problems += [f"{value!r} looks like a key" for value in strings(doc)
                 if any(pattern.search(value) for pattern in LOOKS_LIKE_A_KEY)]
    return problems


def gpu_group_problems(spec: dict[str, Any], recipe: WorkflowSpec) -> list[str]:
    """What keeps the recipe's training off the GPU groups, as Ray's autoscaler reads the cluster."""
    node_types = autoscaler_view(spec)["available_node_types"]
    gpu_types = {name: node for name, node in node_types.items() if node["resources"].get("GPU")}
    problems = [] if gpu_types else ["no worker group has GPUs"]
    for name, node in gpu_types.items():
        if not 0 == node["min_workers"] < node["max_workers"]:
            problems.append(f"{name}: min {node['min_workers']}, max {node['max_workers']}: not autoscaled from 0")
        for stage in ("pretrain", "finetune"):
            resources = getattr(recipe, stage).resources
            per_worker = resources.per_worker()
            fit = int(min(node["resources"].get(kind, 0) // amount for kind, amount in per_worker.items()))
            if fit != node["resources"]["GPU"]:
                problems.append(f"{name}: {node['resources']} holds {fit} {stage} workers of {per_worker}, "
                                f"not one per GPU")
            if fit * node["max_workers"] < resources.num_workers:
                problems.append(f"{name}: at most {fit * node['max_workers']} {stage} workers, the recipe "
                                f"asks for {resources.num_workers}")
    trials = recipe.finetune.search.max_concurrent_trials * recipe.finetune.resources.num_workers
    if sum(node["resources"]["GPU"] * node["max_workers"] for node in gpu_types.values()) < trials:
        problems.append(f"fewer GPUs than the search's {trials} concurrent trial workers")
    return problems


def autoscaler_view(spec: dict[str, Any]) -> dict[str, Any]:
    """The autoscaling config Ray's autoscaler derives from the RayCluster (and checks with Ray's schema)."""
    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "vitflow", "namespace": "default"},
                                                   "spec": copy.deepcopy(spec)})


def entrypoint_spec(rayjob: dict[str, Any]) -> Path:
    """The repository file the RayJob's spec argument names (its working_dir is the image's checkout)."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    return REPO_ROOT / argv[2]


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {name: load(path) for name, path in MANIFESTS.items()}


@pytest.fixture(scope="module")
def recipe(manifests) -> WorkflowSpec:
    return load_spec(entrypoint_spec(manifests["rayjob"]))[0]


def test_the_manifests_are_a_raycluster_and_a_rayjob_on_the_same_cluster(manifests):
    raycluster, rayjob = manifests["raycluster"], manifests["rayjob"]
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    for doc in manifests.values():
        name = doc["metadata"]["name"]
        # KubeRay names Services `<name>-head-svc` (and a RayJob's cluster `<name>-<5 chars>`): DNS-1035 labels.
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(f"{name}-abcde-head-svc") <= 63, name
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], (
        "kuberay/rayjob.yaml's rayClusterSpec must be kuberay/raycluster.yaml's spec, group for group")

    # The job's cluster goes when the job ends (after time to read it), whatever the outcome.
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True and rayjob["spec"]["ttlSecondsAfterFinished"] > 0
    # Only the submitter Job uploads a local working_dir (HTTPMode sends the runtime_env as it is).
    assert rayjob["spec"]["submissionMode"] == "K8sJobMode"


def test_rays_autoscaler_sees_a_cpu_head_with_trial_drivers_and_gpu_workers_scaled_from_zero(manifests, recipe):
    for doc in manifests.values():
        spec = cluster_spec(doc)
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        view = autoscaler_view(spec)
        head = view["available_node_types"][view["head_node_type"]]["resources"]
        assert "GPU" not in head and head["CPU"] >= 1
        # Each concurrent trial's driver holds one; without them, trials fall back to 0.01 CPU and a warning.
        assert head.get(TRIAL_DRIVER_RESOURCE, 0) >= recipe.finetune.search.max_concurrent_trials, head

        # What `ray start` itself gets: KubeRay writes `--resources=VALUE` into a bash command line, and
        # parses VALUE itself first (stripping quotes) to add accelerators.
        value = spec["headGroupSpec"]["rayStartParams"]["resources"]
        (flag,) = shlex.split(f"--resources={value}")
        assert json.loads(flag.removeprefix("--resources=")) == {TRIAL_DRIVER_RESOURCE: head[TRIAL_DRIVER_RESOURCE]}
        assert json.loads(value.strip("'\"` ")) == {TRIAL_DRIVER_RESOURCE: head[TRIAL_DRIVER_RESOURCE]}


def test_the_gpu_workers_fit_the_recipe_the_rayjob_runs(manifests, recipe):
    assert recipe.pretrain.resources.use_gpu and recipe.finetune.resources.use_gpu
    for doc in manifests.values():
        spec = cluster_spec(doc)
        assert gpu_group_problems(spec, recipe) == []
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert requests == limits, "extended resources (nvidia.com/gpu) need requests equal to limits"
            seen = autoscaler_view(spec)["available_node_types"][group["groupName"]]["resources"]
            assert int(limits["nvidia.com/gpu"]) == seen["GPU"] and int(limits["cpu"]) == seen["CPU"]


def test_secrets_come_only_from_the_secrets_the_header_creates(manifests):
    secrets = documented_secrets(header(RAYCLUSTER))
    assert set(secrets) == {"vitflow-ray-token", "vitflow-mlflow", "vitflow-s3"}
    for name, doc in manifests.items():
        assert secret_problems(doc, secrets) == []
        text = MANIFESTS[name].read_text()  # comments too
        assert [match[0] for pattern in LOOKS_LIKE_A_KEY for match in pattern.finditer(text)] == []
        for container in containers(cluster_spec(doc)):
            variables = {variable["name"] for variable in container["env"]}
            assert {"VITFLOW_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= variables, container["name"]


def test_the_checks_catch_literal_secrets_and_undersized_workers(manifests, recipe):
    secrets = documented_secrets(header(RAYCLUSTER))
    planted = copy.deepcopy(manifests["raycluster"])
    env = planted["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"})
    env.append({"name": "HF_HOME", "value": "AKIAIOSFODNN7EXAMPLE"})
    env.append({"name": "MLFLOW_TRACKING_URI", "value": "http://alice:hunter2@mlflow.internal:5000"})
    env.append({"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "typo-s3", "key": "token"}}})
    problems = "\n".join(secret_problems(planted, secrets))
    for expected in ("AWS_SECRET_ACCESS_KEY is not read from a Secret", "'AKIAIOSFODNN7EXAMPLE' looks like a key",
                     "'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' looks like a key", "alice:hunter2@",
                     "reads Secret 'typo-s3'"):
        assert expected in problems

    pretrain = recipe.pretrain.resources
    small = copy.deepcopy(manifests["raycluster"]["spec"])
    worker = small["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits.update({"cpu": str(int(4 * pretrain.cpus_per_worker)), "nvidia.com/gpu": "8"})  # CPUs for 4 of 8 GPUs
    worker["maxReplicas"] = 1
    problems = "\n".join(gpu_group_problems(small, recipe))
    assert "holds 4 pretrain workers" in problems and f"the recipe asks for {pretrain.num_workers}" in problems


def test_the_rayjob_runs_a_real_vitflow_command_on_a_spec_that_validates(manifests):
    rayjob = manifests["rayjob"]
    entrypoint = rayjob["spec"]["entrypoint"]
    argv = shlex.split(entrypoint)
    # KubeRay pastes the entrypoint into a bash command line: nothing in it may be re-read by the shell.
    assert shlex.join(argv) == entrypoint
    assert argv[0] == "vitflow"
    result = run_vitflow(argv[1], "--help")
    assert result.returncode == 0, result.stderr

    # The real CLI's parser takes the whole command (unknown options or missing arguments raise here).
    group = typer.main.get_command(app)
    command = group.get_command(group.context_class(group), argv[1])
    with command.make_context(argv[1], argv[2:]) as context:
        spec = Path(context.params["spec"])
    assert spec == Path(argv[2]) and not spec.is_absolute()

    # The spec is read relative to the job's working_dir: the image's copy of this checkout.
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    working_dir = runtime_env["working_dir"]
    assert working_dir.startswith("/") and f"COPY --chown=ray:users . {working_dir}" in header(RAYCLUSTER)
    assert (REPO_ROOT / spec).is_file()
    result = run_vitflow("validate", "--offline", str(spec), cwd=REPO_ROOT)
    assert result.returncode == 0 and "valid workflow" in result.stdout, result.stderr


@pytest.mark.parametrize("manifest", [RAYCLUSTER, RAYJOB], ids=lambda path: path.name)
def test_every_pod_template_passes_the_kubernetes_schema(manifest):
    spec = cluster_spec(load(manifest))
    for group, template in pod_templates(spec).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"vitflow-{group}"},
                        "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)

    misspelt = copy.deepcopy(pod_templates(spec)["head"])
    misspelt["spec"]["containers"][0]["env"][1]["valueFrom"] = {"secretKeyref": {"name": "vitflow-mlflow", "key": "x"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="secretKeyref"):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "bad"},
                                      "template": misspelt}, KUBERNETES_VERSION, strict=True)


def test_one_change_me_image_the_ray_of_cluster_yaml_and_the_recipes_storage(manifests, recipe):
    for name, doc in manifests.items():
        spec = cluster_spec(doc)
        (image,) = {container["image"] for container in containers(spec)}
        assert re.search(rf"image: .*{re.escape(image)}.*CHANGE-ME", MANIFESTS[name].read_text()), "mark it CHANGE-ME"

        # The same Ray as cluster.yaml's nodes, and as the image recipe in the header.
        pin = re.search(r'"ray\[[^\]]*\]==(\d+\.\d+)\.\*"', (REPO_ROOT / "cluster.yaml").read_text())[1]
        assert spec["rayVersion"].startswith(f"{pin}.")
        assert f"FROM rayproject/ray:{spec['rayVersion']}-" in header(RAYCLUSTER)

        # The pods' default storage is where the recipe keeps its checkpoints.
        for container in containers(spec):
            (storage,) = [v["value"] for v in container["env"] if v["name"] == "VITFLOW_STORAGE"]
            assert storage == recipe.storage_path
