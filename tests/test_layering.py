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


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, anywhere in the file (function level and TYPE_CHECKING
    blocks included: an import inside a function is still a dependency, only a later one)."""
    modules = {}
    for package in ("pipeline", "vit", "workflows"):
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                # `from pkg import mod` depends on pkg.mod; `from pkg import name` on pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import vit.data.x` -> the module that exists
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert "workflows.tracking" in import_graph()["workflows.runner"]  # function-level imports are edges


# The modules that own a framework: MLflow is spoken through tracking (and preflight's reachability check);
# Ray by the compute modules, the two training stages and the live view's Tune callback. A new importer
# is a design decision: add it here on purpose, or call one of these.
OWNERS = {
    "mlflow": {"workflows/tracking/", "workflows/stages/preflight.py"},
    "ray": {"workflows/compute/", "workflows/stages/pretrain.py",
            "workflows/stages/finetune.py", "workflows/runner.py", "workflows/cli/live.py"},
}


@pytest.mark.parametrize("framework", sorted(OWNERS))
def test_frameworks_are_imported_only_by_their_owners(framework):
    importers = {path for path, roots in imported_roots("workflows").items() if framework in roots}
    outside = {path for path in importers if not any(owns(owner, path) for owner in OWNERS[framework])}
    assert not outside, f"{framework} imported outside its owners: {sorted(outside)}"


def owns(owner: str, path: str) -> bool:
    """An owner is a module, or a package (a path ending in /) with every module in it."""
    return path.startswith(owner) if owner.endswith("/") else path == owner


# workflows/ in layers, lowest first. A module imports only from lower layers (inside the tracking, compute
# and cli packages, its own package too); so the stages never import each other, and nothing imports the CLI.
STAGES = ("preprocess", "pretrain", "finetune", "evaluate", "predict", "preflight")
LAYERS = (
    ("recipes", ("workflows.recipes",)),
    ("configs", ("workflows.configs", "workflows.tags")),
    ("results", ("workflows.results",)),
    ("spec", ("workflows.spec",)),
    ("tracking", ("workflows.tracking",)),
    ("compute", ("workflows.compute",)),
    ("stages", tuple(f"workflows.stages.{name}" for name in STAGES)),
    ("cache", ("workflows.cache",)),
    ("runner", ("workflows.runner",)),
    ("cli", ("workflows.cli",)),
)


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the layer's member the module is or belongs to) for a workflows module."""
    for index, (_, members) in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + "."):
                return index, member
    raise AssertionError(f"{module} is in no layer of workflows/: place it in LAYERS (tests/test_layering.py)")


def test_workflows_imports_go_down_the_layers():
    graph = import_graph()
    wrong = []
    for module, imported in sorted(graph.items()):
        if module in ("workflows", "workflows.stages") or not module.startswith("workflows"):
            continue  # the packages' __init__ files (the stages' imports nothing: checked below)
        level, home = layer_of(module)
        for other in sorted(m for m in imported if m.startswith("workflows.")):
            other_level, other_home = layer_of(other)
            if other_level > level or (other_level == level and other_home != home):
                wrong.append(f"{module} ({LAYERS[level][0]}) imports {other} ({LAYERS[other_level][0]})")
    assert not wrong, "\n".join(wrong)


def test_every_stage_module_is_placed_and_the_stages_package_shares_nothing():
    modules = {path.stem for path in (REPO / "workflows" / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES), "a new stage module goes into STAGES (tests/test_layering.py)"
    assert import_graph()["workflows.stages"] == set(), "stages/__init__.py must not import (a shared kernel there would let stages import each other)"
