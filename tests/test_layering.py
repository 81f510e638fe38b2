"""Imports point one way: pipeline -> (nothing of ours); vit -> no ray, mlflow, workflows; only workflows
touches Ray and MLflow. Checked on the source, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        roots = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = roots
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("vit", {"ray", "mlflow", "workflows", "pipeline"}),
        ("pipeline", {"vit", "workflows", "mlflow"}),
    ],
)
def test_imports_point_one_way(package, forbidden):
    offenders = {path: sorted(roots & forbidden) for path, roots in imported_roots(package).items() if roots & forbidden}
    assert not offenders, f"{package}/ must not import {sorted(forbidden)}: {offenders}"


def test_the_model_imports_only_torch():
    roots = imported_roots("vit")["vit/model.py"]
    assert roots <= {"__future__", "math", "torch", "vit"}, roots
