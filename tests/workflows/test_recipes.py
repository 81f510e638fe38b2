"""Named training recipes: each file is well formed and validates as a pre-training section, every key it
sets arrives in the settings, the section's own keys override it, an unknown name is an error that names the
key and the known recipes, and `vitflow recipe list / show` print them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tests.cli import run_vitflow
from workflows.configs import PretrainSettings
from workflows.recipes import HERE, RecipeError, _parse, load_recipe, recipe_names
from workflows.spec import SpecError, load_spec

BUDGET = {"model": {"variant": "Ti/4", "image_size": 32}, "train": {"total_steps": 200}}


def leaves(mapping: dict, prefix: str = "") -> dict[str, object]:
    """{"train.optim.lr": 0.001, ...}: every value a nested mapping sets, by dotted path."""
    found = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            found.update(leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def resolved(settings: PretrainSettings) -> dict[str, object]:
    """The settings as a plain mapping with the model's overrides, data, train and optim side by side."""
    dump = settings.model_dump(mode="json")
    return leaves({**dump, "model": {**dump["model"], **settings.model.overrides()}})


def test_the_four_recipes_are_there_and_well_formed():
    assert recipe_names() == ["augreg-light", "augreg-medium", "deit", "paper"]
    for name in recipe_names():
        recipe = load_recipe(name)
        text = recipe.text()
        # the header first: what the recipe is and where it comes from, before any key
        assert text.startswith(f"# {name}: "), name
        assert {"model", "dataset", "budget", "top1", "evaluated"} == set(recipe.expected)
        assert recipe.expected["top1"] is None or 50 < recipe.expected["top1"] < 100
        # how much to train is the spec's, not the recipe's
        assert not {"variant", "image_size"} & set(recipe.pretrain.get("model", {})), name
        assert "total_steps" not in recipe.pretrain.get("train", {}) and "warmup_steps" not in leaves(recipe.pretrain)


@pytest.mark.parametrize("name", ["paper", "augreg-light", "augreg-medium", "deit"])
def test_every_key_a_recipe_sets_arrives_in_the_settings(name):
    settings = PretrainSettings.model_validate({**BUDGET, "recipe": name})
    values = resolved(settings)
    for key, value in leaves(load_recipe(name).pretrain).items():
        assert values[key] == value, key
    assert settings.recipe == name
    assert PretrainSettings.model_validate(settings.model_dump()) == settings  # a dump validates to itself


def test_the_sources_settings():
    """Spot checks against the sources, so that an edit of a file that breaks them is seen."""
    paper = PretrainSettings.model_validate({**BUDGET, "recipe": "paper"})
    assert (paper.train.optim.lr, paper.train.optim.weight_decay, paper.model.overrides()["dropout"]) == (3e-3, 0.3, 0.1)
    deit = PretrainSettings.model_validate({**BUDGET, "recipe": "deit"})
    assert deit.data.repeated_augmentation == 3 and deit.data.random_erasing == 0.25
    assert (deit.data.mixup_alpha, deit.data.cutmix_alpha, deit.train.label_smoothing) == (0.8, 1.0, 0.1)
    assert deit.train.ema.decay == 0.99996 and deit.train.optim.grad_clip_norm is None
    medium = PretrainSettings.model_validate({**BUDGET, "recipe": "augreg-medium"})
    assert (medium.data.randaugment_magnitude, medium.data.mixup_alpha) == (30, 0.5)  # level 15 capped at 30


def test_the_sections_own_keys_override_the_recipe_key_by_key():
    settings = PretrainSettings.model_validate({
        "recipe": "deit", "model": {"variant": "Ti/4", "image_size": 32, "drop_path": 0.0},
        "data": {"repeated_augmentation": 1, "batch_size": 16},
        "train": {"total_steps": 50, "ema": None, "optim": {"lr": 2e-3, "warmup_steps": 5}},
    })
    assert settings.model.overrides()["drop_path"] == 0.0 and settings.data.repeated_augmentation == 1
    assert settings.data.batch_size == 16 and settings.data.mixup_alpha == 0.8  # the rest of data: the recipe's
    assert settings.train.ema is None  # null switches the recipe's EMA off
    optim = settings.train.optim
    assert (optim.lr, optim.warmup_steps, optim.weight_decay, optim.min_lr_ratio) == (2e-3, 5, 0.05, 0.02)


def test_an_unknown_recipe_is_named_with_the_known_ones(tmp_path):
    for bad in ("nope", 3, ["deit"], "../deit", "DEIT"):
        with pytest.raises(ValidationError, match=r"recipe: .* is not a recipe \(known: augreg-light, augreg-medium, deit, paper"):
            PretrainSettings.model_validate({**BUDGET, "recipe": bad})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "r", "preprocess": {"c": {"source": str(tmp_path)}},
                                    "pretrain": {"dataset": "c", "recipe": "augreg-heavy", **BUDGET}}))
    with pytest.raises(SpecError, match=r"pretrain\.recipe: 'augreg-heavy' is not a recipe"):
        load_spec(spec)
    # a recipe's value that the section cannot take is named by its key, as if the section gave it
    spec.write_text(yaml.safe_dump({"name": "r", "preprocess": {"c": {"source": str(tmp_path)}},
                                    "pretrain": {"dataset": "c", "recipe": "paper", **BUDGET,
                                                 "train": {"total_steps": 200, "optim": {"betas": [0.9, 2]}}}}))
    with pytest.raises(SpecError, match=r"pretrain\.train[\s\S]*betas must be two values"):
        load_spec(spec)


def test_a_malformed_recipe_file_is_refused_naming_it(tmp_path):
    good = yaml.safe_load((HERE / "paper.yaml").read_text())
    for change, message in (({"top1": 77.9}, "unknown"), ({"name": "other"}, "is not the file's name"),
                            ({"expected": {"top1": 1}}, "expected must give exactly"),
                            ({"pretrain": {"recipe": "deit"}}, "cannot name another recipe")):
        path = tmp_path / "paper.yaml"
        path.write_text(yaml.safe_dump({**good, **change}))
        with pytest.raises(RecipeError, match=re.escape(str(path)) + ".*" + message):
            _parse(path)


def test_vitflow_recipe_list_and_show():
    listed = run_vitflow("recipe", "list")
    assert listed.returncode == 0, listed.stderr
    for name in recipe_names():
        assert name in listed.stdout
    assert "72.2% top-1" in listed.stdout and "77.9% top-1" in listed.stdout
    shown = run_vitflow("recipe", "show", "deit")
    assert shown.returncode == 0 and shown.stdout == Path(HERE / "deit.yaml").read_text()
    missing = run_vitflow("recipe", "show", "nope")
    assert missing.returncode == 2 and "'nope' is not a recipe (known: augreg-light" in missing.stderr
    assert "Traceback" not in missing.stderr
