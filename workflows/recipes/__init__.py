"""Named training recipes: the settings a published ViT training recipe fixes, as YAML files beside this
module, selected in a pre-training section by ``recipe: NAME``.

A recipe file holds a header (``summary``, ``source``, and ``expected``: the result the source reports
with these settings, with the model, dataset and budget it was reached on, as big_vision's configs state
theirs) and ``pretrain``, the keys of a pre-training section it sets. It sets *how* to train (optimiser,
weight decay, clipping, augmentation, regularisation, EMA); the section keeps *how much* (model size,
batch size, steps, warm-up), which the header gives for the source's own run. Keys the section gives
override the recipe's, mapping by mapping as ``extends`` merges spec files (:func:`merge`).

Plain YAML and a dictionary merge: Hydra or OmegaConf would do the merge, at the price of a second
configuration system beside the pydantic one that validates every section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_HEADER = ("name", "summary", "source", "expected", "pretrain")
_EXPECTED = ("model", "dataset", "budget", "top1", "evaluated")


class RecipeError(ValueError):
    """An unknown recipe name, or a recipe file that is not well formed."""


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    source: str
    expected: dict[str, Any]  # model, dataset, budget, top1 (percent), evaluated (how, e.g. fine-tuned at 384)
    pretrain: dict[str, Any]  # keys of a pre-training section
    path: Path

    def text(self) -> str:
        """The file as written: its comments explain each choice."""
        return self.path.read_text(encoding="utf-8")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: mappings merge key by key, any other value (a scalar, a list, null)
    replaces the base's. Neither argument is changed."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def recipe_names() -> list[str]:
    return sorted(path.stem for path in HERE.glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """The recipe called ``name``; :class:`RecipeError` names the known ones when there is none."""
    if not isinstance(name, str) or not _NAME.match(name) or not (HERE / f"{name}.yaml").is_file():
        raise RecipeError(f"{name!r} is not a recipe (known: {', '.join(recipe_names())}; `vitflow recipe list`)")
    return _read(HERE / f"{name}.yaml")


@cache
def _read(path: Path) -> Recipe:
    return _parse(path)


def _parse(path: Path) -> Recipe:
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    problems = []
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    missing, unknown = [k for k in _HEADER if k not in data], sorted(set(data) - set(_HEADER))
    if missing or unknown:
        problems.append(f"keys {missing} missing, {unknown} unknown (a recipe has {', '.join(_HEADER)})")
    elif data["name"] != path.stem:
        problems.append(f"name {data['name']!r} is not the file's name {path.stem!r}")
    elif not isinstance(data["pretrain"], dict) or not isinstance(data["expected"], dict):
        problems.append("pretrain and expected must be mappings")
    elif sorted(data["expected"]) != sorted(_EXPECTED):
        problems.append(f"expected must give exactly {', '.join(_EXPECTED)}")
    elif "recipe" in data["pretrain"]:
        problems.append("a recipe cannot name another recipe")
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))
    return Recipe(name=data["name"], summary=str(data["summary"]), source=str(data["source"]),
                  expected=dict(data["expected"]), pretrain=data["pretrain"], path=path)


def apply_recipe(section: dict[str, Any]) -> dict[str, Any]:
    """A pre-training section with its ``recipe`` (if any) merged under it: the section's keys win."""
    name = section.get("recipe")
    if name is None:
        return section
    return merge(load_recipe(name).pretrain, section)
