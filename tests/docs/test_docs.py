"""The documentation: every Python block of every page runs, and the site builds with ``mkdocs build --strict``.

Each page's ```python blocks run in order in one namespace (a fresh module per page), in a temporary
working directory. A block is skipped only when the line before its opening fence is ``<!-- no-test -->``
(for what cannot run here: downloads, GPUs, several processes). ``--8<-- "path"`` lines inside a block
(pymdownx.snippets includes) are replaced by the file they name, as the site does.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCS = ROOT / "docs"
NO_TEST = "<!-- no-test -->"
OPEN_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`{]*)")
INCLUDE = re.compile(r'^[ \t]*-+8<-+[ \t]+"(?P<path>[^"]+)"[ \t]*$')
PYTHON = {"python", "py", "python3"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool


def _expand_includes(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        match = INCLUDE.match(line)
        if match is None:
            out.append(line)
            continue
        path = match.group("path")
        assert ":" not in path, f"section includes are for shell snippets, not Python blocks: {path}"
        out.extend((ROOT / path).read_text().splitlines())
    return out


def code_blocks(page: Path) -> list[tuple[int, str, str, bool]]:
    """(line, language, code, skipped) of every fenced block of a Markdown page, in order."""
    lines = page.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = OPEN_FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, lang = match.group("indent"), match.group("fence"), match.group("lang").lower()
        start = i
        i += 1
        body = []
        while i < len(lines) and not (
            lines[i].startswith(indent) and lines[i].strip().startswith(fence[0] * len(fence))
            and set(lines[i].strip()) == {fence[0]}
        ):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        assert i < len(lines), f"{page}:{start + 1}: unclosed code fence"
        i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        blocks.append((start + 1, lang, "\n".join(_expand_includes(body)) + "\n", before == NO_TEST))
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [Block(page, line, code, skipped) for line, lang, code, skipped in code_blocks(page) if lang in PYTHON]


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if not any(part.startswith("_") for part in p.relative_to(DOCS).parts))


PAGES_WITH_PYTHON = [p for p in pages() if any(not b.skipped for b in python_blocks(p))]


@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*")  # tiny data sets
@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_of_the_page_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # the examples package lives in the repository, not installed
    for variable in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # set by seed_everything; restored after the page
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(DOCS).with_suffix("")))
    module = types.ModuleType(name)  # a real module, so that classes defined on the page pickle
    monkeypatch.setitem(sys.modules, name, module)
    for block in python_blocks(page):
        if block.skipped:
            continue
        where = f"{page.relative_to(ROOT)}:{block.line}"
        exec(compile(block.code, where, "exec"), module.__dict__)


def example_job_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every ``python -m examples.main`` command in a bash block of the docs or the README."""
    found = []
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for line, lang, code, _ in code_blocks(page):
            for command in code.replace("\\\n", " ").splitlines() if lang == "bash" else []:
                words = shlex.split(command, comments=True)
                if "examples.main" in words:
                    found.append((f"{page.relative_to(ROOT)}:{line}", words[words.index("examples.main") + 1:]))
    return found


@pytest.mark.parametrize("command", example_job_commands(), ids=lambda c: f"{c[0]} {' '.join(c[1])}")
def test_example_job_commands_parse(command, monkeypatch, capsys):
    """Each documented command of the main job parses (``--print_config``: nothing runs, nothing is written)."""
    from examples.main import build_cli

    where, args = command
    monkeypatch.chdir(ROOT)  # the commands run from the repository root
    monkeypatch.setattr(sys, "argv", ["examples.main"])
    shows_help = any(a == "--help" or a.endswith(".help") for a in args)
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args if shows_help else [*args, "--print_config"])
    assert exit_info.value.code == 0, f"{where}: {args}\n{capsys.readouterr().err[-3000:]}"


def test_shell_snippets_hold_no_python():
    """The shared snippets are shell commands; Python blocks live on the pages, where they are run."""
    for path in (DOCS / "_snippets").glob("*.md"):
        assert not any(lang in PYTHON for _, lang, _, _ in code_blocks(path)), path


def test_block_extraction():
    page = DOCS / "getting-started.md"
    blocks = python_blocks(page)
    assert blocks and not any(b.skipped for b in blocks)
    assert "class ConvNet" in blocks[0].code and "--8<--" not in blocks[0].code  # the include is expanded
    assert blocks[0].code.startswith("import ")  # dedented out of the collapsible block
    compile(blocks[0].code, str(page), "exec")


def _rst_markup():
    pytest.importorskip("griffe", reason="the docs extra is not installed: pip install -e '.[docs]'")
    spec = importlib.util.spec_from_file_location("rst_markup", DOCS / "_griffe" / "rst_markup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sphinx_markup_becomes_markdown():
    import griffe

    rst = _rst_markup()
    package = griffe.load("lightning_worm", search_paths=[str(ROOT)])
    cls = package["callbacks.early_bird.EarlyBirdCallback"]
    text = (
        "Uses :class:`~lightning_worm.PruneAndFinetune` and :func:`torch.compile`.\n\n"
        "Example::\n\n    early_bird = EarlyBirdCallback()\n    trainer.fit(model)\n\nAfter."
    )
    out = rst.rewrite(cls, text)
    assert "[`PruneAndFinetune`][lightning_worm.PruneAndFinetune]" in out
    assert "`torch.compile()`" in out and "[`torch.compile" not in out
    assert "Examples:\n    ```python\n    early_bird = EarlyBirdCallback()\n    trainer.fit(model)\n    ```" in out
    assert out.endswith("After.")
    doctest = rst.rewrite(cls, "Example::\n\n    >>> 1 + 1\n    2\n")
    assert doctest.startswith("Examples:\n    >>> 1 + 1\n    2")
    assert rst.rewrite(cls, "Markdown `code` only.") == "Markdown `code` only."


def test_mkdocs_build_strict(tmp_path: Path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] is not installed")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(  # in a temporary folder: nothing lands in the checkout
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert (tmp_path / "site" / "reference" / "callbacks" / "index.html").is_file()


def test_every_page_is_in_the_nav():
    """A page missing from ``nav`` still builds (mkdocs only logs it), but no menu leads to it."""
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:"):config.index("\nplugins:")]
    entries = re.findall(r"[\w./-]+\.md", nav)
    listed = set(entries)
    twice = sorted({e for e in entries if entries.count(e) > 1})
    assert len(entries) == len(listed), f"pages listed twice in the nav: {twice}"
    missing = [str(p.relative_to(DOCS)) for p in pages() if str(p.relative_to(DOCS)) not in listed]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"
    assert not [p for p in listed if not (DOCS / p).is_file()], "nav names a page that does not exist"
