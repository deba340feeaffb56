"""The package as users install it: the wheel's contents, one version, every import declared."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lightning_worm
from tests.helpers import ROOT

PACKAGE = ROOT / "lightning_worm"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads TOML")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_wheel_ships_license_py_typed_and_one_version(tmp_path):
    pytest.importorskip("setuptools", minversion="77", reason="builds with setuptools>=77 (the test extra)")
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(PACKAGE, source / "lightning_worm", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("lightning_worm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(f"{info}/METADATA").decode()
        license_text = archive.read(f"{info}/licenses/LICENSE").decode()
    assert "lightning_worm/py.typed" in names
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert f"\nVersion: {lightning_worm.__version__}\n" in metadata  # the version has one source
    assert wheel.name.startswith(f"lightning_worm-{lightning_worm.__version__}-")
    assert "License-Expression: Apache-2.0" in metadata
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)


def test_license_matches_pyproject():
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License\n")
    assert (PACKAGE / "py.typed").is_file()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, lazy) of every absolute import; lazy: inside a function or ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], child_lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child_lazy))
            visit(child, child_lazy)

    visit(tree, False)
    return found


def test_every_runtime_import_is_declared():
    """A module-level import needs a dependency; a lazy one (inside a function) at least an extra."""
    project = _pyproject()["project"]
    required = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, lazy in _imports(path):
            if module in sys.stdlib_module_names or module in ("__future__", "lightning_worm"):
                continue
            if module not in providers:
                problems.append(f"{path.relative_to(ROOT)}: `{module}` is not installed here: cannot check it")
                continue
            names = {_name(d) for d in providers[module]}
            if not names & (required | optional if lazy else required):
                where = "an optional extra" if lazy else "`dependencies`"
                problems.append(f"{path.relative_to(ROOT)}: `{module}` ({', '.join(sorted(names))}) is not in {where}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_citation_and_changelog_follow_the_version():
    yaml = pytest.importorskip("yaml")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["version"] == lightning_worm.__version__
    assert citation["license"] == _pyproject()["project"]["license"]
    titles = [reference["title"] for reference in citation["references"]]
    assert titles == ["Drawing Early-Bird Tickets: Towards More Efficient Training of Deep Networks",
                      "The EarlyBird Gets the WORM: Heuristically Accelerating EarlyBird Convergence"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"\n## {lightning_worm.__version__} - " in changelog
