"""Sources by name, and which tests need the optional `transformers`."""

import ast
from pathlib import Path

import pytest

import lightning_worm
from lightning_worm import (
    AttentionHeadSource,
    AttentionQKSource,
    LayerNormSource,
)
from lightning_worm.core.sources import SOURCES, resolve_source
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_library_never_imports_transformers():
    # Static: Lightning itself imports `transformers` when it is installed, so sys.modules cannot tell.
    root = Path(lightning_worm.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "transformers" for n in names), path


def test_sources_are_registered_by_name():
    for key, cls in (("attention_qk", AttentionQKSource), ("attention_heads", AttentionHeadSource),
                     ("layernorm", LayerNormSource)):
        assert SOURCES[key] is cls and isinstance(resolve_source(key), cls)


def test_only_the_tests_that_need_transformers_skip_without_it(tmp_path):
    """Run a few attention tests where `transformers` cannot be imported: the BERT ones skip, not the rest."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, lightning, pytest\n"  # Lightning (torchmetrics) imports transformers itself: hide it after
        "for name in [n for n in sys.modules if n.split('.')[0] == 'transformers']:\n"
        "    del sys.modules[name]\n"
        "sys.modules['transformers'] = None\n"
        "sys.exit(pytest.main([*sys.argv[1:], '-q', '-p', 'no:cacheprovider', '-k',\n"
        "                      'elementwise_truncation_touches or removing_heads_equals']))\n"
    )
    files = [str(ROOT / "tests" / "core" / "sources" / "test_attention.py"),
             str(ROOT / "tests" / "core" / "surgery" / "test_heads.py")]
    proc = subprocess.run([sys.executable, "-c", script, *files], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "5 passed, 3 skipped" in proc.stdout, proc.stdout[-2000:]  # vit, packed, mha; vit, packed | bert, llama
