"""The package's layers: no module imports from a layer above its own (docs/architecture.md,
"Layout")."""

from __future__ import annotations

import ast

import pytest
from conftest import ROOT

LAYERS = [
    ["ray_lt.errors", "ray_lt.config", "ray_lt.log", "ray_lt.stages", "ray_lt.atomic",
     "ray_lt.rundir", "ray_lt.cluster", "ray_lt.reference"],
    ["ray_lt.data"],
    ["ray_lt.evaluate.metrics", "ray_lt.evaluate.plots"],
    ["ray_lt.train"],
    ["ray_lt.evaluate"],
    ["ray_lt.generate"],
    ["ray_lt.pipeline", "ray_lt.report", "ray_lt.planning", "ray_lt.export"],
    ["ray_lt.tune"],
    ["ray_lt.commands", "ray_lt.cli"],
    # The package's face: the Python API (``import ray_lt``), and the tiny test parts that
    # nothing in the pipeline may import.
    ["ray_lt", "ray_lt.api", "ray_lt.testing"],
]


def layer(module: str) -> int:
    """The layer of ``module``: of its own name, else of its longest listed package. The top
    package ``ray_lt`` names itself only, so a module missing from the list has no layer."""
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            inside = name != "ray_lt" and module.startswith(name + ".")
            if (module == name or inside) and name.count(".") > depth:
                best, depth = i, name.count(".")
    assert best is not None, f"{module} is in no layer of tests/test_layers.py"
    return best


def imports(path) -> set[str]:
    """Every ray_lt module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ray_lt"):
            for alias in node.names:  # "from ray_lt import pipeline" names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).is_file()
                          or (ROOT / sub.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ray_lt"))
    return found


def test_no_import_runs_up_the_layers():
    upward = []
    for path in sorted((ROOT / "ray_lt").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for target in imports(path):
            if layer(target) > layer(module):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_layers_cover_every_module():
    for path in (ROOT / "ray_lt").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        layer(".".join(parts[:-1] if parts[-1] == "__init__" else parts))


def test_a_module_in_no_layer_is_named():
    with pytest.raises(AssertionError, match="ray_lt.unlisted is in no layer"):
        layer("ray_lt.unlisted")
    assert layer("ray_lt.generate.new_kind") == layer("ray_lt.generate")
    assert layer("ray_lt") == len(LAYERS) - 1
