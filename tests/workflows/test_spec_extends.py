"""`extends:` in a workflow spec: how a file merges over its base, where each file's paths resolve, the
errors that name the files, the toy-scale cluster recipe, and what `vitflow submit` ships. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cli import run_vitflow
from tests.conftest import REPO_ROOT
from workflows.compute.jobs import ship
from workflows.spec import SpecError, load_spec, merge, spec_document

BASE = {
    "name": "base",
    "tracking": {"uri": "sqlite:///base.db", "experiment": "base"},
    "preprocess": {
        "corpus": {"source": "data/corpus", "config": {"max_size": 64, "val_fraction": 0.1}},
        "downstream": {"source": "s3://bucket/downstream"},
    },
    "finetune": {"dataset": "downstream", "pretrained": "models:/vit-pretrained/1",
                 "train": {"total_steps": 10, "eval_every": 5, "checkpoint_every": 5},
                 "search": {"image_size": [32, 48], "lr": {"min": 0.001, "max": 0.01}}},
    "evaluate": {"dataset": "downstream"},
}


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_merge_combines_mappings_and_replaces_everything_else():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "scalar": 1, "kept": "base"}
    override = {"a": {"c": [3], "d": {"f": 2}}, "scalar": 2, "new": None}
    assert merge(base, override) == {"a": {"b": 1, "c": [3], "d": {"e": 1, "f": 2}}, "scalar": 2, "kept": "base",
                                     "new": None}
    assert base == {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "scalar": 1, "kept": "base"}  # unchanged
    assert merge({"a": {"b": 1}}, {"a": "flat"}) == {"a": "flat"}  # a mapping replaced by a scalar


def test_a_spec_extends_a_base_in_another_folder(tmp_path):
    write(tmp_path / "recipes" / "base.yaml", BASE)
    top = write(tmp_path / "mine" / "spec.yaml", {
        "extends": "../recipes/base.yaml",
        "name": "mine",
        "preprocess": {"corpus": {"config": {"val_fraction": 0.2}, "out": "shards/corpus"}},
        "finetune": {"search": {"image_size": [64]}},
    })
    spec, folder = load_spec(top)
    assert folder == (tmp_path / "mine").resolve()
    assert spec.name == "mine" and spec.tracking.experiment == "base"  # scalar replaced; base keys kept
    corpus = spec.preprocess["corpus"]
    assert corpus.config.val_fraction == 0.2 and corpus.config.max_size == 64  # nested mapping merged
    assert spec.finetune.search.image_size == [64]  # a list replaces the base's list
    assert spec.finetune.search.lr.max == 0.01 and spec.finetune.train.total_steps == 10
    # Each relative path against the folder of the file that gives it; the workdir default against the top's.
    assert corpus.source == str((tmp_path / "recipes" / "data" / "corpus").resolve())
    assert corpus.out == str((tmp_path / "mine" / "shards" / "corpus").resolve())
    assert spec.preprocess["downstream"].source == "s3://bucket/downstream"
    assert spec.workdir == str((tmp_path / "mine").resolve())


def test_a_workdir_the_base_sets_resolves_against_the_base(tmp_path):
    write(tmp_path / "recipes" / "base.yaml", {**BASE, "workdir": "../scratch"})
    spec, _ = load_spec(write(tmp_path / "mine" / "spec.yaml", {"extends": "../recipes/base.yaml"}))
    assert spec.workdir == str((tmp_path / "scratch").resolve())


def test_a_chain_of_two_extends(tmp_path):
    write(tmp_path / "a" / "base.yaml", BASE)
    write(tmp_path / "b" / "middle.yaml", {"extends": "../a/base.yaml", "name": "middle",
                                           "tracking": {"experiment": "middle"}})
    top = write(tmp_path / "top.yaml", {"extends": str((tmp_path / "b" / "middle.yaml").resolve()),  # absolute
                                        "tracking": {"uri": "sqlite:///top.db"}})
    spec, _ = load_spec(top)
    assert (spec.name, spec.tracking.experiment, spec.tracking.uri) == ("middle", "middle", "sqlite:///top.db")
    assert spec.preprocess["corpus"].source == str((tmp_path / "a" / "data" / "corpus").resolve())
    document, bases = spec_document(top)
    assert "extends" not in document and "workdir" not in document
    assert [path.resolve() for path in bases] == [(tmp_path / "b" / "middle.yaml").resolve(),
                                                  (tmp_path / "a" / "base.yaml").resolve()]


def test_a_missing_base_names_the_file_the_value_and_the_resolved_path(tmp_path):
    top = write(tmp_path / "spec.yaml", {"extends": "recipes/nowhere.yaml", "name": "x"})
    with pytest.raises(SpecError) as error:
        load_spec(top)
    assert str(error.value) == (f"{top}: extends 'recipes/nowhere.yaml': no such file "
                                f"{(tmp_path / 'recipes' / 'nowhere.yaml').resolve()}")


def test_a_cycle_is_named_with_its_chain(tmp_path):
    a = write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(SpecError) as error:
        load_spec(a)
    assert str(error.value) == f"{a}: extends in a cycle: {a} -> {tmp_path / 'b.yaml'} -> {a}"
    itself = write(tmp_path / "self.yaml", {"extends": "./self.yaml"})
    with pytest.raises(SpecError, match="extends in a cycle: .*self.yaml -> .*self.yaml$"):
        load_spec(itself)


@pytest.mark.parametrize("value", [["base.yaml"], 3, None, ""])
def test_extends_must_be_a_path(tmp_path, value):
    top = write(tmp_path / "spec.yaml", {"extends": value, "name": "x"})
    with pytest.raises(SpecError) as error:
        load_spec(top)
    assert str(error.value) == f"{top}: extends: the path of the spec it builds on (a string), got {value!r}"


def test_an_unusable_extends_path_is_a_spec_error(tmp_path):
    top = write(tmp_path / "spec.yaml", {"extends": "base\0.yaml", "name": "x"})
    with pytest.raises(SpecError, match=r"spec.yaml: extends 'base\\x00.yaml': not a usable path"):
        load_spec(top)


@pytest.mark.parametrize("text, reason", [
    ("- a list\n", "a workflow spec is a YAML mapping, got list"),
    ("", "a workflow spec is a YAML mapping, got NoneType"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_a_base_that_is_not_a_spec_is_named_with_the_file_that_extends_it(tmp_path, text, reason):
    base = write(tmp_path / "base.yaml", text)
    top = write(tmp_path / "spec.yaml", {"extends": "base.yaml"})
    with pytest.raises(SpecError) as error:
        load_spec(top)
    assert str(error.value).startswith(f"{base} (extended by {top}): {reason}")


def test_a_typo_in_the_extending_file_names_the_key_and_both_files(tmp_path):
    write(tmp_path / "recipes" / "base.yaml", BASE)
    top = write(tmp_path / "spec.yaml", {"extends": "recipes/base.yaml",
                                         "finetune": {"train": {"totl_steps": 5}}})
    with pytest.raises(SpecError) as error:
        load_spec(top)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{top} (extends {tmp_path / 'recipes' / 'base.yaml'}): invalid workflow spec (1 problem)"
    assert "finetune.train.totl_steps" in lines[1]


def toy_spec(tmp_path: Path) -> Path:
    """The user's own two-line spec over the toy recipe."""
    toy = REPO_ROOT / "workflows" / "imagenet21k-vit-b16-toy.yaml"
    return write(tmp_path / "toy.yaml", {"extends": str(toy), "tracking": {"uri": f"sqlite:///{tmp_path}/x.db"}})


def test_the_toy_recipe_keeps_every_location_in_its_bucket_and_trains_on_two_cpu_workers(tmp_path):
    spec, _ = load_spec(toy_spec(tmp_path))
    assert spec.name == "imagenet21k-vit-b16-toy" and spec.tracking.experiment == "vit-b16-toy"
    assert spec.tracking.uri == f"sqlite:///{tmp_path}/x.db"
    locations = dict(spec._uris())
    stored = {key: value for key, value in locations.items() if key not in ("workdir", "tracking.uri", "ray.address")}
    assert set(stored) == {"storage_path", "preprocess.imagenet21k.source", "preprocess.imagenet21k.out",
                           "preprocess.downstream.source", "preprocess.downstream.out"}
    assert all(value.startswith("s3://vitflow-toy/") for value in stored.values()), stored
    assert spec.preprocess["imagenet21k"].source == "s3://vitflow-toy/corpora/cifar10"
    assert spec.preprocess["downstream"].source == "s3://vitflow-toy/corpora/flowers17"
    resources = spec.pretrain.resources
    assert (resources.num_workers, resources.cpus_per_worker, resources.use_gpu) == (2, 1, False)
    assert not spec.finetune.resources.use_gpu and spec.finetune.resources.num_workers == 1
    assert spec.pretrain.train.total_steps == 60 and spec.pretrain.model.variant == "Ti/8"
    # The recipe's tracking server placeholder stays when no spec of the user's sets one.
    recipe, _ = load_spec(REPO_ROOT / "workflows" / "imagenet21k-vit-b16.yaml")
    alone, _ = load_spec(REPO_ROOT / "workflows" / "imagenet21k-vit-b16-toy.yaml")
    assert alone.tracking.uri == recipe.tracking.uri and alone.workdir == recipe.workdir


def test_submit_ships_an_extending_spec_merged_and_a_plain_one_byte_for_byte(tmp_path):
    top = toy_spec(tmp_path)
    relative = ship(top, tmp_path / "staged", project_root=None)
    shipped = tmp_path / "staged" / relative
    assert shipped.name == "toy.yaml" and "extends" not in yaml.safe_load(shipped.read_text())
    assert load_spec(shipped)[0] == load_spec(top)[0]

    # Local paths as resolved here, a base's relative workdir too.
    write(tmp_path / "recipes" / "base.yaml", {**BASE, "workdir": "scratch"})
    mine = write(tmp_path / "mine.yaml", {"extends": "recipes/base.yaml", "name": "mine"})
    shipped = tmp_path / "staged2" / ship(mine, tmp_path / "staged2", project_root=None)
    document = yaml.safe_load(shipped.read_text())
    assert document["preprocess"]["corpus"]["source"] == str((tmp_path / "recipes" / "data" / "corpus").resolve())
    assert load_spec(shipped)[0] == load_spec(mine)[0]
    # No workdir unless a file sets one: it resolves on the cluster, as a plain spec's does.
    write(tmp_path / "recipes" / "base.yaml", BASE)
    shipped = tmp_path / "staged3" / ship(mine, tmp_path / "staged3", project_root=None)
    assert "workdir" not in yaml.safe_load(shipped.read_text())

    plain = write(tmp_path / "plain.yaml", "# a comment\nname:   demo   # kept as written\n")
    shipped = tmp_path / "staged4" / ship(plain, tmp_path / "staged4", project_root=None)
    assert shipped.read_bytes() == plain.read_bytes()


def test_submit_refuses_a_spec_whose_base_is_missing_before_it_calls_the_cluster(tmp_path):
    top = write(tmp_path / "spec.yaml", {"extends": "missing.yaml", "name": "x"})
    result = run_vitflow("submit", str(top), "--address", "http://127.0.0.1:9")  # nothing would answer there
    assert result.returncode == 2 and "extends 'missing.yaml': no such file" in result.stderr
    assert "cannot reach" not in result.stderr
