"""The package's imports point one way: callbacks -> core; masks, detector, truncation, surgery -> sources;
sources -> nothing downstream; the core knows nothing of Lightning. Lazy imports (inside functions) count too."""

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "lightning_worm"


def imported(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n == "lightning_worm" or n.startswith("lightning_worm.")}


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_knows_nothing_of_lightning_or_the_callbacks(path):
    names = imported(path)
    assert not {n for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")}, path
    pure = ("lightning_worm.core", "lightning_worm._internals", "lightning_worm._deprecation")
    assert not {n for n in ours(names) if not n.startswith(pure)}, path


@pytest.mark.parametrize("path", modules("core/sources"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sources_import_nothing_downstream(path):
    allowed = ("lightning_worm.core.sources", "lightning_worm.core.validation", "lightning_worm.core.sharding",
               "lightning_worm.core.gates",  # a leaf, like sharding: it imports nothing of ours
               "lightning_worm._internals.torch")
    assert {n for n in ours(imported(path)) if not n.startswith(allowed)} == set(), path


@pytest.mark.parametrize("name", ["masks", "detector", "truncation", "regularization", "measure", "inputs"])
def test_the_search_and_the_measures_do_not_reach_into_the_surgery(name):
    names = ours(imported(PACKAGE / "core" / f"{name}.py"))
    assert not {n for n in names if n.startswith("lightning_worm.core.surgery")}


def test_every_unit_removal_is_in_the_surgery_package():
    """No module outside ``core/surgery`` cuts parameters: torch-pruning's pruners and torch's pruning live there."""
    cutting = ("torch_pruning", "torch.nn.utils.prune")
    outside = [path for path in PACKAGE.rglob("*.py") if "surgery" not in path.parts and "_internals" not in path.parts
               and {n for n in imported(path) if n.startswith(cutting)}]
    assert outside == []


def test_every_module_says_what_is_public():
    """Each module lists its public names in ``__all__``; every listed name exists and none starts with ``_``."""
    import importlib
    import pkgutil

    import lightning_worm

    problems = []
    for info in pkgutil.walk_packages(lightning_worm.__path__, "lightning_worm."):
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            problems.append(f"{info.name}: no __all__")
            continue
        problems += [f"{info.name}.{n}: listed, missing" for n in names if not hasattr(module, n)]
        problems += [f"{info.name}.{n}: private name listed" for n in names if n.startswith("_")]
    assert problems == []
