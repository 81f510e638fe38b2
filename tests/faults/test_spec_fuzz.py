"""Bad workflow specs, generated: every mutation of a valid spec ends in a ``SpecError`` that names the key
path (never another exception), and a well-formed model URI that is not in the store is caught before any
work starts. Mutations start from the shipped specs and the workflow tests' mini specs."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli import run_vitflow
from tests.conftest import REPO_ROOT
from tests.workflows.test_runner import mini_spec
from vit import ViTConfig
from workflows.spec import SpecError, WorkflowSpec, _key_names, load_spec, parse_spec

pytestmark = pytest.mark.slow

FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _without_pretrain() -> dict:
    """A spec that fine-tunes and evaluates registered models: the model-URI fields are set."""
    spec = mini_spec(Path("/data/cifar10"), Path("/data/flowers17"))
    del spec["pretrain"]
    spec["finetune"]["pretrained"] = "models:/vit-pretrained/1"
    spec["evaluate"]["model"] = "models:/vit-finetuned@champion"
    return spec


BASES = {
    "quickstart": yaml.safe_load((REPO_ROOT / "workflows" / "quickstart.yaml").read_text()),
    "imagenet21k": yaml.safe_load((REPO_ROOT / "workflows" / "imagenet21k-vit-b16.yaml").read_text()),
    "mini": mini_spec(Path("/data/cifar10"), Path("/data/flowers17")),
    "registered-models": _without_pretrain(),
}
SPEC_FILE = Path("fuzzed.yaml")


def nodes(data, path: tuple = ()):
    """(path, value) of every node below the root, depth first."""
    children = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in children:
        yield path + (key,), value
        yield from nodes(value, path + (key,))


def get(data, path: tuple):
    for key in path:
        data = data[key]
    return data


def with_value(base: dict, path: tuple, value) -> dict:
    spec = copy.deepcopy(base)
    get(spec, path[:-1])[path[-1]] = value
    return spec


def rejection(spec) -> str:
    """The SpecError's message; anything else (acceptance, another exception) fails the test."""
    try:
        parse_spec(spec, SPEC_FILE)
    except SpecError as error:
        return str(error)
    raise AssertionError(f"accepted: {spec!r}")


def assert_names(message: str, path: tuple) -> str:
    """One of the message's problem lines is at ``path`` (or below it); returns that line."""
    dotted = ".".join(str(part) for part in path)
    assert message.startswith(f"{SPEC_FILE}: invalid workflow spec"), message
    for line in message.splitlines()[1:]:
        where = line.strip()
        if where.startswith(f"{dotted}:") or where.startswith(f"{dotted}."):
            return where
    raise AssertionError(f"no problem at {dotted!r} in:\n{message}")


def test_the_bases_are_valid():
    for name, base in BASES.items():
        assert isinstance(parse_spec(base, Path(f"{name}.yaml")), WorkflowSpec)


# --- wrong types -------------------------------------------------------------------------------------

def other_types(value):
    """Values of other types than ``value``: never one pydantic would coerce (no numeric strings, no bools
    for numbers, no None for optional fields)."""
    if isinstance(value, bool):
        return ["maybe", [1], {"a": 1}, 2.5]
    if isinstance(value, (int, float)):
        return ["plenty", [1], {"a": 1}]
    if isinstance(value, str):
        return [12345, 2.5, ["a"], {"a": 1}]
    if isinstance(value, list):
        return ["text", 7, {"a": 1}]
    return ["text", 7, [1, 2]]  # a mapping


@FUZZ
@given(st.data())
def test_wrong_types_are_rejected_at_their_key(data):
    base = BASES[data.draw(st.sampled_from(sorted(BASES)), label="base")]
    candidates = [(path, value) for path, value in nodes(base) if value is not None]
    path, value = data.draw(st.sampled_from(candidates), label="node")
    wrong = data.draw(st.sampled_from(other_types(value)), label="value")
    assert_names(rejection(with_value(base, path, wrong)), path)


# --- unknown keys ------------------------------------------------------------------------------------

KNOWN = _key_names()
unknown_keys = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(lambda key: key not in KNOWN)


@FUZZ
@given(st.data())
def test_unknown_keys_are_rejected_at_their_path(data):
    base = BASES[data.draw(st.sampled_from(sorted(BASES)), label="base")]
    mappings = [()] + [path for path, value in nodes(base) if isinstance(value, dict)]
    parent = data.draw(st.sampled_from(mappings), label="parent")
    key = data.draw(unknown_keys, label="key")
    value = data.draw(st.sampled_from([1, "x", [1], {"a": 1}]), label="value")
    spec = copy.deepcopy(base)
    get(spec, parent)[key] = value
    line = assert_names(rejection(spec), parent + (key,))
    if parent != ("preprocess",):  # there a new key is a new stage, checked as one
        assert "unknown" in line, line


# --- missing required fields -------------------------------------------------------------------------

REQUIRED = ("name", "preprocess.*.source", "pretrain.dataset", "pretrain.train", "pretrain.train.total_steps",
            "finetune.dataset", "finetune.train", "finetune.train.total_steps", "finetune.search",
            "finetune.search.image_size", "finetune.search.lr", "finetune.search.lr.min", "finetune.search.lr.max",
            "finetune.search.scheduler.grace_period", "evaluate.dataset")


def required_present(base: dict) -> list[tuple]:
    found = []
    for path, _ in nodes(base):
        dotted = ".".join(str(part) for part in path)
        if any(re.fullmatch(pattern.replace(".", r"\.").replace("*", r"[^.]+"), dotted) for pattern in REQUIRED):
            found.append(path)
    return found


@FUZZ
@given(st.data())
def test_missing_required_fields_are_named(data):
    base = BASES[data.draw(st.sampled_from(sorted(BASES)), label="base")]
    path = data.draw(st.sampled_from(required_present(base)), label="removed")
    spec = copy.deepcopy(base)
    del get(spec, path[:-1])[path[-1]]
    assert_names(rejection(spec), path)


def test_a_section_another_one_needs_is_named():
    spec = copy.deepcopy(BASES["mini"])
    del spec["pretrain"]  # fine-tuning now needs `pretrained`
    assert "needed when the spec has no pretrain stage" in assert_names(rejection(spec), ("finetune", "pretrained"))
    spec = copy.deepcopy(BASES["mini"])
    del spec["finetune"]  # evaluation now needs `model`
    assert_names(rejection(spec), ("evaluate", "model"))


def test_fine_tune_keys_the_search_sets_are_refused_at_their_path():
    """The fine-tune section's old nesting, and values the search would overwrite, are named with where
    their value belongs."""
    quickstart = BASES["quickstart"]
    cases = {
        ("finetune", "finetune"): ({"mode": "full", "optim": {"optimizer": "sgd"}}, "write finetune.optim / finetune.mode"),
        ("finetune", "train", "optim"): ({"lr": 0.5}, "the section's optim (finetune.optim in a workflow spec): move it there"),
        ("finetune", "data", "image_size"): (64, "the search's search.image_size chooses the resolution"),
        ("finetune", "image_size"): (64, "the search's search.image_size chooses the resolution"),
        ("finetune", "optim", "lr"): (0.5, "the search's search.lr chooses the learning rate"),
    }
    for path, (value, says) in cases.items():
        assert says in assert_names(rejection(with_value(quickstart, path, value)), path)


# --- negative sizes ----------------------------------------------------------------------------------

SIZES = {"batch_size", "image_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "total_steps", "log_every",
         "eval_every", "checkpoint_every", "warmup_steps", "max_size", "max_shard_samples", "target_shard_bytes",
         "jpeg_quality", "shard_multiple", "num_samples", "max_concurrent_trials", "grace_period", "num_workers",
         "cpus_per_worker", "num_cpus", "workers", "shuffle_buffer", "max_failures", "checkpoints_to_keep"}


def sizes(base: dict) -> list[tuple]:
    return [path for path, value in nodes(base)
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and (path[-1] in SIZES or (isinstance(path[-1], int) and path[-2] == "image_size"))]


@FUZZ
@given(st.data())
def test_negative_sizes_are_rejected_at_their_key(data):
    base = BASES[data.draw(st.sampled_from(sorted(BASES)), label="base")]
    path = data.draw(st.sampled_from(sizes(base)), label="size")
    negative = data.draw(st.integers(min_value=-10**9, max_value=-1), label="value")
    assert_names(rejection(with_value(base, path, negative)), path)


# --- image sizes the patch size does not divide ------------------------------------------------------

def patch_size(base: dict) -> int:
    return int(base["pretrain"]["model"]["variant"].split("/")[1])


@FUZZ
@given(st.data())
def test_image_sizes_the_patch_does_not_divide_are_rejected(data):
    name = data.draw(st.sampled_from(sorted(name for name, base in BASES.items() if "pretrain" in base)), label="base")
    base = BASES[name]
    patch = patch_size(base)
    size = patch * data.draw(st.integers(1, 64), label="patches") + data.draw(st.integers(1, patch - 1), label="rest")
    where = data.draw(st.sampled_from(["pretrain", "finetune"]), label="section")
    if where == "pretrain":
        path = ("pretrain", "model", "image_size")
        message = rejection(with_value(base, path, size))
    else:
        path = ("finetune", "search", "image_size")
        sizes = list(get(base, path))
        sizes[data.draw(st.integers(0, len(sizes) - 1), label="index")] = size
        message = rejection(with_value(base, path, sizes))
    assert "not divisible" in assert_names(message, path)


# --- malformed model URIs ----------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_-]{0,15}", fullmatch=True)
malformed_uris = st.one_of(
    names.map(lambda name: f"models:/{name}"),  # no version, no alias
    st.tuples(names, st.from_regex(r"[a-z]{1,6}", fullmatch=True)).map(lambda p: f"models:/{p[0]}/{p[1]}"),
    st.tuples(names, st.integers(1, 999)).map(lambda p: f"models:/{p[0]}/{p[1]}\n"),
    st.tuples(names, st.sampled_from(["", "al ias", "a/b", "a!"])).map(lambda p: f"models:/{p[0]}@{p[1]}"),
    st.tuples(st.sampled_from(["model", "Models", "modles", "mlflow", "hf", "s3", "http"]), names,
              st.integers(1, 999)).map(lambda p: f"{p[0]}:/{p[1]}/{p[2]}"),
    st.tuples(st.sampled_from(["models://", "models:", "runs://", "runs:"]), names).map("".join),
    st.from_regex(r"[G-Zg-z][0-9a-z]{3,12}", fullmatch=True).map(lambda run: f"runs:/{run}/model"),  # not hex
    names.map(lambda name: f"runs:/{name}"),
    st.sampled_from(["", " ", "models:/", "runs:/", "models:/ vit/1", "hf://google/vit-base-patch16-224"]),
)


@FUZZ
@given(st.data())
def test_malformed_model_uris_are_rejected_at_their_key(data):
    targets = [(name, path) for name, base in BASES.items()
               for path in (("finetune", "pretrained"), ("evaluate", "model")) if path[0] in base]
    name, path = data.draw(st.sampled_from(targets), label="field")
    uri = data.draw(malformed_uris, label="uri")
    assert "is not a model URI" in assert_names(rejection(with_value(BASES[name], path, uri)), path)


# --- whatever a YAML file holds ----------------------------------------------------------------------

@settings(max_examples=200, deadline=None, database=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                              max_leaves=20).map(yaml.safe_dump)))
def test_any_file_content_ends_in_a_spec_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "spec.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    with pytest.raises(SpecError, match=re.escape(str(path))):
        load_spec(path)


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=200))
def test_any_bytes_end_in_a_spec_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("bytes") / "spec.yaml"
    path.write_bytes(raw)
    with pytest.raises(SpecError, match=re.escape(str(path))):
        load_spec(path)


TEXT_FIELDS = (("name",), ("workdir",), ("storage_path",), ("tracking", "uri"), ("tracking", "experiment"),
               ("ray", "address"), ("preprocess", "cifar", "source"), ("preprocess", "cifar", "out"),
               ("finetune", "pretrained"), ("evaluate", "model"), ("evaluate", "split"))


@FUZZ
@given(st.data())
def test_any_text_in_name_path_and_uri_fields_is_accepted_or_a_spec_error(tmp_path_factory, data):
    spec = copy.deepcopy(BASES["mini"])
    path = data.draw(st.sampled_from(TEXT_FIELDS), label="field")
    text = data.draw(st.text(max_size=40), label="text")
    node = spec
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = text
    file = tmp_path_factory.mktemp("text") / "spec.yaml"
    file.write_text(yaml.safe_dump(spec))
    try:
        load_spec(file)
    except SpecError as error:
        assert str(error).startswith(str(file)), error


def test_yaml_tags_never_construct_python_objects(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\npreprocess: {{}}\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)
    assert not marker.exists()


# --- well-formed model URIs that are not in the store: the preflight, before any work ----------------

@pytest.fixture
def registry(tmp_path):
    """A real MLflow store holding vit-pretrained version 1 (alias `champion`, patch size 4) and one run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("registry", artifact_location=(tmp_path / "store" / "artifacts").as_uri())
    run = client.create_run(experiment)
    # Its config alone (as log_vit_model writes it): the preflight reads the patch size, never the weights.
    config = tmp_path / "store" / "vit_config.json"
    config.write_text(json.dumps(ViTConfig(image_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2).to_dict()))
    client.log_artifact(run.info.run_id, str(config), "model/extra_files")
    client.create_registered_model("vit-pretrained")
    client.create_model_version("vit-pretrained", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("vit-pretrained", "champion", "1")
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


def registered_spec(tmp_path, tracking_uri: str, pretrained: str, evaluate_model: str | None = None) -> dict:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    spec = mini_spec(corpus, corpus)
    del spec["pretrain"]
    spec["workdir"] = str(tmp_path / "work")
    spec["tracking"] = {"uri": tracking_uri, "experiment": "preflight"}
    spec["finetune"]["pretrained"] = pretrained
    if evaluate_model:
        spec["evaluate"]["model"] = evaluate_model
    return spec


def test_models_missing_from_the_store_fail_the_preflight_at_their_key(tmp_path, registry):
    from workflows.runner import WorkflowRunner
    from workflows.stages.preflight import PreflightError

    uri, run_id = registry

    def preflight(spec: dict) -> None:
        WorkflowRunner(parse_spec(spec, SPEC_FILE)).preflight()

    for present in ("models:/vit-pretrained/1", "models:/vit-pretrained@champion", f"runs:/{run_id}/model"):
        preflight(registered_spec(tmp_path, uri, present))  # exist: no error
    missing = {
        ("finetune", "pretrained"): ["models:/vit-pretrained/2", "models:/vit-pretrained@nobody", "models:/nope/1",
                                     "runs:/0123456789abcdef0123456789abcdef/model", "models:/m-0123456789abcdef"],
        ("evaluate", "model"): ["models:/vit-finetuned@champion", "models:/vit-pretrained/7"],
    }
    for path, uris in missing.items():
        for wrong in uris:
            spec = registered_spec(tmp_path, uri, wrong if path[0] == "finetune" else "models:/vit-pretrained/1",
                                   wrong if path[0] == "evaluate" else None)
            with pytest.raises(PreflightError) as error:
                preflight(spec)
            assert str(error.value).startswith(f"{'.'.join(path)}: {wrong} does not exist"), str(error.value)
    # A store that does not exist yet holds no models (and is not created by asking).
    empty = tmp_path / "nothing" / "mlflow.db"
    with pytest.raises(PreflightError, match="finetune.pretrained: models:/vit-pretrained/1 does not exist"):
        preflight(registered_spec(tmp_path, f"sqlite:///{empty}", "models:/vit-pretrained/1"))
    assert not empty.exists()


# --- the same through `vitflow validate` (the CLI application, in-process: tests.cli) ------------------------------------------

def validate(path: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = run_vitflow("validate", str(path))
    return result, time.monotonic() - start


def test_vitflow_validate_names_file_and_key_without_a_traceback(tmp_path, registry):
    uri, _ = registry
    quickstart = BASES["quickstart"]
    cases = {
        "pretrain.train.total_steps": with_value(quickstart, ("pretrain", "train", "total_steps"), "many"),
        "finetune.search.bogus": with_value(quickstart, ("finetune", "search", "bogus"), 1),
        "finetune.finetune": with_value(quickstart, ("finetune", "finetune"), {"mode": "full"}),
        "preprocess.cifar10.source": copy.deepcopy(quickstart) | {"preprocess": {"cifar10": {"config": {}}}},
        "pretrain.data.batch_size": with_value(quickstart, ("pretrain", "data", "batch_size"), -8),
        "pretrain.model.image_size": with_value(quickstart, ("pretrain", "model", "image_size"), 30),
        "finetune.pretrained": with_value(quickstart, ("finetune", "pretrained"), "models:/vit-pretrained"),
        "tracking.uri": with_value(quickstart, ("tracking", "uri"), "http://user:hunter2@mlflow.internal:5000"),
    }
    for key, spec in cases.items():
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(spec))
        result, elapsed = validate(path)
        assert result.returncode == 2, (key, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
        assert f"error: {path}: invalid workflow spec" in result.stderr, result.stderr
        assert re.search(rf"^  {re.escape(key)}: ", result.stderr, re.MULTILINE), result.stderr
        print(f"vitflow validate ({key}): exit {result.returncode} in {elapsed:.1f} s")

    # Well-formed, but not in the store: the same command checks the registry before anything runs.
    path = tmp_path / "missing-model.yaml"
    path.write_text(yaml.safe_dump(registered_spec(tmp_path, uri, "models:/vit-pretrained/9")))
    result, elapsed = validate(path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"error: {path}: finetune.pretrained: models:/vit-pretrained/9 does not exist" in result.stderr
    path.write_text(yaml.safe_dump(registered_spec(tmp_path, uri, "models:/vit-pretrained@champion")))
    result, _ = validate(path)
    assert result.returncode == 0, result.stderr
    print(f"vitflow validate (missing registered model): exit 2 in {elapsed:.1f} s")


def test_vitflow_validate_checks_the_search_resolutions_against_a_registered_model(tmp_path, registry):
    """A registered pre-trained model's patch size (4 here) must divide every fine-tuning resolution. The
    store holds the model's config alone, no weights: the check reads nothing more."""
    uri, _ = registry
    spec = registered_spec(tmp_path, uri, "models:/vit-pretrained@champion")
    spec["finetune"]["search"]["image_size"] = [32, 50]
    path = tmp_path / "patch.yaml"
    path.write_text(yaml.safe_dump(spec))
    result, elapsed = validate(path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"error: {path}: finetune.search.image_size: [50] not divisible by the patch size 4 of the pre-trained "
            "model models:/vit-pretrained@champion") in result.stderr, result.stderr
    spec["finetune"]["search"]["image_size"] = [32, 52]
    path.write_text(yaml.safe_dump(spec))
    assert validate(path)[0].returncode == 0
    print(f"vitflow validate (resolution vs registered patch size): exit 2 in {elapsed:.1f} s")
